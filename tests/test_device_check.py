"""scripts/device_check.sh on a machine without CUDA: it stops at once saying so (exit 2)
unless told --dry-run, refuses bad arguments by name, and installs carried wheels offline
into $OUT/site. Its Python checks are tests/test_gpu.py, whose device-agnostic cases run on
CPU in the ordinary suite."""
from __future__ import annotations

import os
import subprocess
import zipfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "device_check.sh"
pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the script's no-CUDA behaviour")


def _run(tmp_path, *args):
    env = dict(os.environ, OUT=str(tmp_path / "out"))
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)


def _wheel(directory: Path) -> None:
    """A minimal pure-Python wheel ``carried_probe`` (what `pip download` would carry)."""
    info = "carried_probe-0.1.dist-info"
    with zipfile.ZipFile(directory / "carried_probe-0.1-py3-none-any.whl", "w") as whl:
        whl.writestr("carried_probe/__init__.py", "VALUE = 42\n")
        whl.writestr(f"{info}/METADATA", "Metadata-Version: 2.1\nName: carried_probe\nVersion: 0.1\n")
        whl.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        whl.writestr(f"{info}/RECORD", "")


def test_bad_arguments_and_missing_wheels_are_named(tmp_path):
    done = _run(tmp_path, "--fast")
    assert done.returncode == 2 and "unknown argument '--fast'" in done.stderr
    (tmp_path / "empty").mkdir()
    done = _run(tmp_path, "--wheels", str(tmp_path / "empty"))
    assert done.returncode == 2 and "no wheels (*.whl)" in done.stderr


def test_carried_wheels_install_offline_then_without_cuda_it_stops_and_says_why(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    _wheel(wheels)
    done = _run(tmp_path, "--wheels", str(wheels))
    assert (tmp_path / "out" / "site" / "carried_probe" / "__init__.py").exists()
    assert done.returncode == 2
    assert "no CUDA device here" in done.stderr and "--dry-run" in done.stderr


def test_backend_check_runs_every_backend_against_float64():
    """The backends benchmark device_check.sh runs: every backend this device runs (here sdpa,
    math, and fa3 / torch_varlen on their CPU stand-ins) per block kind within the dtype's
    tolerance of float64; one it cannot run is a row with the reason."""
    from recipes.benchmarks.backends import BackendBenchConfig, measure
    from tests.fa3_standin import fa3_on_cpu
    from tests.torch_flash_standin import torch_flash_on_cpu

    assert "recipes.benchmarks.backends" in SCRIPT.read_text()
    cfg = BackendBenchConfig(seqlen=32, heads=4, kv_heads=2, head_dim=16, window=5, iters=1)
    with torch_flash_on_cpu(), fa3_on_cpu():
        rows = measure(cfg, torch.device("cpu"))
    ran = {(r["backend"], r["kind"]) for r in rows if "ms" in r}
    for name in ("fa3", "torch_varlen", "sdpa", "math"):
        assert {(name, kind) for kind in ("full", "causal", "window", "varlen")} <= ran, name
    assert ("fa3", "softcap") in ran and ("torch_varlen", "softcap") not in ran
    assert all(r["ok"] for r in rows if "ms" in r), [r for r in rows if not r.get("ok", True)]
    flash = [r for r in rows if r["backend"] == "flash_attn"]
    assert flash and all("CUDA only" in r["skipped"] for r in flash)
