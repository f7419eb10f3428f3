"""Atomic, resumable DeepSpeed checkpoints under ``<run_dir>/checkpoints``.

Save: every rank writes into ``.tmp-step_N`` (DeepSpeed model / optimizer / scheduler
state plus this rank's RNG); after a barrier rank 0 writes ``meta.json`` (step, data
position, shapes) and renames the directory to ``step_N`` -- a single atomic rename, so a
crash mid-save leaves only a ``.tmp-`` directory that is ignored, and the previous
``step_*`` stays the latest complete checkpoint. Load never writes: a corrupt or
incompatible checkpoint is reported and left untouched.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

DIRNAME = "checkpoints"
# Fault injection for the tests only (tests/test_train.py): a save at this step exits abruptly
# with the save half done. Not a config field: no user run sets it.
TEST_CRASH_ENV = "RINGATTN_TEST_CRASH_IN_SAVE_AT_STEP"
_STEP_RE = re.compile(r"^step_(\d+)$")


class CheckpointError(RuntimeError):
    pass


def root(run_dir: str) -> str:
    return os.path.join(run_dir, DIRNAME)


def latest(run_dir: str) -> Optional[str]:
    """Path of the newest complete checkpoint (a ``step_N`` dir with meta.json), or None."""
    r = root(run_dir)
    if not os.path.isdir(r):
        return None
    found = []
    for name in os.listdir(r):
        m = _STEP_RE.match(name)
        if m and os.path.exists(os.path.join(r, name, "meta.json")):
            found.append((int(m.group(1)), name))
    return os.path.join(r, max(found)[1]) if found else None


def read_meta(path: str) -> dict:
    try:
        with open(os.path.join(path, "meta.json")) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path} is corrupt (meta.json unreadable: {e}); "
                              "it was left untouched -- remove it or use another hydra.run.dir") from e


def check_compatible(path: str, meta: dict, expect: dict) -> None:
    """``expect``: the facts of this run that a checkpoint must match to be resumed."""
    diffs = {k: (meta.get(k), v) for k, v in expect.items() if meta.get(k) != v}
    if diffs:
        detail = "; ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in diffs.items())
        raise CheckpointError(f"checkpoint {path} is incompatible with this run ({detail}); "
                              "it was left untouched -- use another hydra.run.dir")


def _rng_state() -> dict:
    s = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        s["cuda"] = torch.cuda.get_rng_state()
    return s


def _set_rng_state(s: dict) -> None:
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    torch.set_rng_state(s["torch"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state(s["cuda"])


def save(engine, run_dir: str, step: int, meta: dict, rank: int) -> str:
    r = root(run_dir)
    tmp_tag, tag = f".tmp-step_{step:08d}", f"step_{step:08d}"
    if rank == 0:
        os.makedirs(r, exist_ok=True)
        shutil.rmtree(os.path.join(r, tmp_tag), ignore_errors=True)  # left by an earlier crash
    dist.barrier()
    engine.save_checkpoint(r, tag=tmp_tag, client_state={"step": step}, save_latest=False)
    torch.save(_rng_state(), os.path.join(r, tmp_tag, f"rng_rank{rank:05d}.pt"))
    dist.barrier()
    if os.environ.get(TEST_CRASH_ENV) == str(step):
        os._exit(17)
    if rank == 0:
        with open(os.path.join(r, tmp_tag, "meta.json"), "w") as f:
            json.dump(dict(meta, step=step), f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        final = os.path.join(r, tag)
        if os.path.exists(final):  # the same step saved again (a rerun past a deleted later ckpt)
            shutil.rmtree(final)
        os.rename(os.path.join(r, tmp_tag), final)
    dist.barrier()
    return os.path.join(r, tag)


def verify_files(path: str) -> None:
    """Open every tensor file of a checkpoint (memory-mapped: cheap) so corruption is found
    before any rank enters DeepSpeed's collective loading. Run on one rank."""
    for name in sorted(os.listdir(path)):
        if name.endswith(".pt"):
            try:
                torch.load(os.path.join(path, name), map_location="cpu", mmap=True, weights_only=False)
            except Exception as e:
                raise CheckpointError(f"checkpoint {path} is corrupt ({name}: {type(e).__name__}: {e}); "
                                      "it was left untouched -- remove it or use another hydra.run.dir") from e


def load(engine, path: str, rank: int) -> None:
    """Load model, optimizer, scheduler and this rank's RNG from a complete checkpoint."""
    try:
        load_path, _ = engine.load_checkpoint(os.path.dirname(path), tag=os.path.basename(path))
    except Exception as e:  # DeepSpeed raises anything from torch.load / key errors
        raise CheckpointError(f"checkpoint {path} could not be loaded ({type(e).__name__}: {e}); "
                              "it was left untouched -- remove it or use another hydra.run.dir") from e
    if load_path is None:
        raise CheckpointError(f"checkpoint {path} could not be loaded (DeepSpeed found no state); "
                              "it was left untouched")
    rng = os.path.join(path, f"rng_rank{rank:05d}.pt")
    if os.path.exists(rng):
        _set_rng_state(torch.load(rng, weights_only=False))
