"""Helpers for the end-to-end recipe tests: launch ``recipes.train`` as a subprocess
(one process, or torchrun --standalone which picks its own free port) and read what it wrote."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]

# tiny, fast and fp32: a 32-token passkey task, 8 sequences per step, every step logged
FAST = [
    "model=tiny", "data.seq_len=32", "data.global_batch_size=8", "data.passkey_digits=1",
    "data.eval_batch_size=8", "trainer.eval_every=0", "trainer.log_every=1", "trainer.dtype=fp32",
    "optim.warmup_steps=1", "optim.lr=2e-3",
    # eps well above fp32 rounding of near-zero gradient elements: Adam would otherwise turn
    # summation-order noise in them into full-size updates, which no equivalence can survive
    "optim.eps=1e-6",
]


def clean_env(extra=None) -> dict:
    """This environment without launcher / W&B variables, one thread per process, the repo importable."""
    e = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "TORCHELASTIC_", "RANK", "LOCAL_RANK",
                                                                    "WORLD_SIZE", "MASTER_", "SLURM_"))}
    e.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    e.update(extra or {})
    return e


def launch(run_dir, nproc: int = 1, overrides=(), timeout: int = 240, env=None, torchrun_args=()):
    """Run the recipe; returns the CompletedProcess (check .returncode yourself).
    ``torchrun_args``: more torchrun flags (``nproc > 1``), e.g. ``--max-restarts=1``."""
    args = ["-m", "recipes.train", *FAST, *overrides, f"hydra.run.dir={run_dir}"]
    if nproc > 1:
        args = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *torchrun_args, *args]
    try:
        return subprocess.run([sys.executable, *args], cwd=REPO, env=clean_env(env), capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired as ex:
        tail = (ex.stderr or b"")[-3000:]
        raise AssertionError(f"recipe timed out after {timeout}s: {args}\n{tail}") from None


def tail(proc, n: int = 3000) -> str:
    return f"exit {proc.returncode}\n--- stdout ---\n{proc.stdout[-n:]}\n--- stderr ---\n{proc.stderr[-n:]}"


def train_ok(run_dir, nproc: int = 1, overrides=(), **kw):
    proc = launch(run_dir, nproc, overrides, **kw)
    assert proc.returncode == 0, f"training failed\n{tail(proc)}"
    return proc


def train_fails(run_dir, nproc: int = 1, overrides=(), **kw):
    proc = launch(run_dir, nproc, overrides, **kw)
    assert proc.returncode != 0, f"training should have failed\n{tail(proc)}"
    return proc


def metrics(run_dir) -> dict:
    """step -> logged row; asserts each step is logged once."""
    rows = [json.loads(ln) for ln in Path(run_dir, "metrics.jsonl").read_text().splitlines() if ln.strip()]
    steps = [r["step"] for r in rows]
    assert len(steps) == len(set(steps)), f"duplicate steps in metrics.jsonl: {steps}"
    return {r["step"]: r for r in rows}


def final_weights(run_dir) -> dict:
    """The module state of the newest complete checkpoint (ZeRO 0-2 keep it whole on rank 0)."""
    ckpts = sorted(Path(run_dir, "checkpoints").glob("step_*"))
    assert ckpts, f"no complete checkpoint in {run_dir}"
    sd = torch.load(ckpts[-1] / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    return sd["module"]


def assert_losses_close(a: dict, b: dict, steps, rel: float = 1e-4):
    for s in steps:
        la, lb = a[s]["loss"], b[s]["loss"]
        assert abs(la - lb) <= rel * abs(la), f"step {s}: loss {la!r} vs {lb!r} (rel {abs(la - lb) / abs(la):.2e})"


def assert_weights_close(a: dict, b: dict, rel: float = 1e-4):
    assert a.keys() == b.keys()
    for k in a:
        scale = a[k].abs().max().item()
        diff = (a[k].float() - b[k].float()).abs().max().item()
        assert diff <= rel * scale, f"{k}: max diff {diff:.3e} vs scale {scale:.3e}"
