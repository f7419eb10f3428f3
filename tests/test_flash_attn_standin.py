"""flash-attn's real Python package, two releases, on a CPU stand-in for its compiled kernels.

.ci/run installs flash-attn 2.8.3 (torch.library custom ops, ``window_size_left/right``)
into the environment and 2.6.3 (plain functions, a ``window_size`` pair, padded returns)
into .cache/flash-attn-2.6.3, both without their CUDA build. Each release runs
``tests.flash_attn_checks`` in its own process (that release first on the path): the
stand-in against float64, ringattn's flash backend block by block, and backend="flash_attn"
under ring, Ulysses and hybrid with every layout, documents, windows, sinks and softcap,
fp32 against float64 (tolerances in tests/flash_attn_checks.py), and the backend over block
shapes (tall, wide, one row, one key, zero-length varlen sequences) x windows in float64. 2.8.3 runs them at P = 2
and (slow tier) P = 4 (2 x 2 hybrid), 2.6.3 at P = 2 (hybrid: a ring of one inside): one
launch per release and P keeps the cost down while every strategy runs on both.
"""
from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ringattn.kernels.flash import FlashAttnBackend
from tests.distributed import worlds

ROOT = Path(__file__).resolve().parents[1]
OLD_RELEASE = ROOT / ".cache" / "flash-attn-2.6.3"  # .ci/run installs it there


def _installed(path=None) -> str | None:
    dists = importlib.metadata.distributions(name="flash_attn", path=[str(path)]) if path else \
        importlib.metadata.distributions(name="flash_attn")
    return next((d.version for d in dists), None)


def _run_checks(extra_path, worlds):
    env = dict(os.environ)
    paths = [str(p) for p in (extra_path, ROOT) if p is not None]
    env["PYTHONPATH"] = os.pathsep.join(paths + [env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    done = subprocess.run([sys.executable, "-m", "tests.flash_attn_checks", "--worlds", worlds],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _check(summary, release, world):
    assert summary["release"] == release
    assert summary["standin"] and max(summary["standin"].values()) <= 1e-10, summary["standin"]
    assert any("varlen" in case for case in summary["standin"])
    assert summary["empty_rows"], "hidden rows: out 0 and lse +inf, as the CUDA kernels"
    # flash-attn itself refuses MLA's narrower v: the backend's padding ("mla" blocks) is needed
    assert "v must have shape" in summary["mla_refused"], summary["mla_refused"]
    assert {"mla causal", "mla window", "mla varlen", "mla wide v"} <= set(summary["block"])
    bad = {n: e for n, e in summary["block"].items() if not e <= 1e-5}
    assert not bad, bad
    # block shapes x windows through FlashAttnBackend under flash-attn's real window rule
    bad = {n: e for n, e in summary["shapes"].items() if not e <= 1e-10}
    assert not bad and len(summary["shapes"]) >= 150, (len(summary["shapes"]), bad)
    assert "needs 'dout'" in summary["missing"], summary["missing"]
    matrix = summary["matrix"][str(world)]
    assert not matrix["failures"], matrix["failures"][:5]
    assert matrix["runs"] >= 50, matrix["runs"]
    # flash-attn itself ran full, causal, window (band) and varlen (documents) blocks; only
    # irregular tiles (a window whose keys jump between zigzag chunks) may leave it
    blocks = matrix["blocks"]
    for kind in ("full", "causal", "window", "varlen"):
        assert blocks.get(f"flash_attn/{kind}", 0) > 0, blocks
    assert not any(k.startswith("flash_attn/mask") for k in blocks), blocks
    fused = sum(n for k, n in blocks.items() if k.startswith("flash_attn/"))
    assert fused > 4 * sum(n for k, n in blocks.items() if k.endswith("/mask")), blocks


@pytest.mark.skipif(_installed() != "2.8.3",
                    reason="flash-attn 2.8.3 is not installed (bash .ci/run installs it)")
@pytest.mark.parametrize("world", worlds(2))  # the ring around the kernel at P = 4: test_ring_attention
def test_flash_attn_2_8_on_cpu_standin(world):
    _check(_run_checks(None, str(world)), "2.8.3", world)


@pytest.mark.skipif(_installed(OLD_RELEASE) != "2.6.3",
                    reason=f"flash-attn 2.6.3 is not in {OLD_RELEASE.name} (bash .ci/run installs it)")
@pytest.mark.parametrize("world", worlds(2, quick=()))  # the older release: its glue, full suite only
def test_flash_attn_2_6_on_cpu_standin(world):
    _check(_run_checks(OLD_RELEASE, str(world)), "2.6.3", world)


def test_flash_attn_refuses_gpus_before_ampere(monkeypatch):
    """The compute-capability check, with the capability query patched (no GPU here)."""
    backend = FlashAttnBackend()
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    why = backend.device_problem(cuda, torch.bfloat16, 64)
    assert why is not None and "Ampere (sm80)" in why and "sm75" in why, why
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    why = backend.device_problem(cuda, torch.bfloat16, 64)
    assert why is None or "sm" not in why, why  # sm80 passes the check (installed or not)
    assert "fp16/bf16" in backend.device_problem(cuda, torch.float32, 64)
    # no stand-in loaded in this process: CPU tensors are refused
    assert backend.device_problem(torch.device("cpu"), torch.float32, 64) == "flash-attn runs on CUDA only"


def test_benchmark_reports_which_kernel_ran_each_block_kind():
    """The attention benchmark's ``kernels`` column, from a profiled one-process run on CPU:
    a window is one band block on sdpa, packed documents one varlen block, softcap on math."""
    import ringattn
    from recipes.benchmarks.attention import kernels_by_block
    from ringattn import profile

    q = torch.randn(1, 32, 2, 8)
    cu = torch.tensor([0, 5, 20, 32], dtype=torch.int32)
    runs = {"window": dict(window_size=(4, 0)), "documents": dict(cu_seqlens=cu),
            "softcap window": dict(window_size=(4, 0), softcap=5.0)}
    seen = {}
    for name, kw in runs.items():
        with profile.RingProfile() as prof:
            ringattn.SequenceParallel.single().attention(q, q, q, causal=True, **kw)
        seen[name] = kernels_by_block(prof)
    assert seen == {"window": {"sdpa/window": 1}, "documents": {"sdpa/varlen": 1},
                    "softcap window": {"math/window": 1}}, seen


@pytest.mark.parametrize("release,features", [("2.5.9", False), ("2.6.0", True), ("2.8.3", True)])
def test_varlen_and_softcap_need_flash_attn_2_6(monkeypatch, release, features):
    """mha_varlen_fwd returns lse (batch, heads, max_seqlen_q) up to 2.5.9 and (heads, total_q)
    from 2.6.0, which the merge reads; softcap came in 2.6.0 too. Read from the installed
    version (patched here), so get_backend routes varlen blocks elsewhere on older releases."""
    import importlib.metadata as md

    real = md.version
    monkeypatch.setattr(md, "version", lambda name: release if name == "flash_attn" else real(name))
    backend = FlashAttnBackend()
    assert backend.supports_varlen is features and backend.supports_softcap is features
