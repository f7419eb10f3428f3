"""The package: `pip install ringattn` needs torch only, and the library imports without the
recipes' dependencies; the recipes are not an installed top-level package."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.train_launch import REPO

EXTRAS_ONLY = ("deepspeed", "hydra", "omegaconf", "wandb", "datasets", "transformers", "accelerate",
               "matplotlib", "flash_attn", "trl")


def test_base_requirements_are_torch_only_and_recipes_are_not_packaged():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert project["project"]["dependencies"] == ["torch>=2.4"]
    assert {"train", "hf", "flash", "dev"} <= set(project["project"]["optional-dependencies"])
    assert project["tool"]["setuptools"]["packages"]["find"]["include"] == ["ringattn*"]


def test_library_imports_without_the_extras():
    """Importing ringattn (front door, models) with every extra's package made unimportable."""
    blocker = (
        "import sys\n"
        f"BLOCKED = {EXTRAS_ONLY!r}\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in BLOCKED:\n"
        "            raise ImportError(f'{name} is blocked: not a base dependency')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import ringattn, ringattn.models\n"
        "sp = ringattn.SequenceParallel('ring', 'zigzag')\n"
        "print('ok', sorted(m for m in sys.modules if m.split('.')[0] in BLOCKED))\n"
    )
    proc = subprocess.run([sys.executable, "-c", blocker], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "ok []", proc.stdout
