"""The documentation site builds with warnings as errors, and its API reference documents
every public name.

``mkdocs build --strict`` (the pinned ``[docs]`` extra) renders docs/ and the reference that
mkdocstrings generates from the docstrings (docs/api.md); a broken link, a missing page in
the nav or a docstring the handler cannot render fails it. The reference is generated from
``ringattn.__all__`` and ``ringattn.models.__all__``, so a name added there later appears
without editing the page: the test checks that each one has an entry with a docstring.
"""
from __future__ import annotations

import inspect
import re
import subprocess
import sys

import pytest

import ringattn
import ringattn.models
from tests.train_launch import REPO

pytest.importorskip("mkdocstrings_handlers.python", reason="the [docs] extra is not installed")


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    out = tmp_path_factory.mktemp("site")
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out


@pytest.mark.parametrize("module", [ringattn, ringattn.models], ids=lambda m: m.__name__)
def test_api_reference_documents_every_public_name(site, module):
    html = (site / "api" / "index.html").read_text()
    anchors = set(re.findall(r'id="([\w.]+)"', html))
    for name in module.__all__:
        obj = getattr(module, name)
        assert f"{module.__name__}.{name}" in anchors, f"{module.__name__}.{name} missing from the API reference"
        doc = (inspect.getdoc(obj) or "").strip()
        # a dataclass without a docstring gets its signature as one: that is not documentation
        assert doc and not doc.startswith(f"{name}("), f"{module.__name__}.{name} has no docstring"


def test_docs_pages_are_all_built(site):
    pages = {p.stem for p in (REPO / "docs").glob("*.md")}
    built = {p.parent.name for p in site.glob("*/index.html")}
    assert pages - {"index"} <= built, pages - built
