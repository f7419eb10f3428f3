"""Atomic, verified, reshapeable DeepSpeed checkpoints under ``<run_dir>/checkpoints``.

Save: every rank writes into ``.tmp-step_N`` (DeepSpeed model / optimizer / scheduler state
plus this rank's RNG); the ranks hash a share of the files each; rank 0 writes ``meta.json``
(step, data position, shapes), then ``manifest.json`` (size and SHA-256 of every other file,
written last) and renames the directory to ``step_N`` -- a single atomic rename, so a crash
mid-save leaves only a ``.tmp-`` directory that is ignored. Retention (``retain``) never deletes
the checkpoint just written, renames corrupt ones aside instead of counting them, and counts a
universal copy as one more checkpoint.

Resume (``find_resumable``): the newest ``step_N`` whose files match its manifest, checked
before anything big is built; a truncated or missing file makes it fall back to the previous
one with a warning naming the bad one. Nothing is ever rewritten by a load.

Reshape (``needs_universal``): ZeRO partitions the optimizer state over the ranks (the recipe
gives DeepSpeed every rank as a replica, so over the whole world), and DeepSpeed's own loader
refuses another partitioning. A checkpoint of partitioned state resumed at another world size
or ZeRO stage (1 <-> 2; 3 stays 3) is converted once to DeepSpeed's *universal* format (one fp32 / exp_avg /
exp_avg_sq / step file per parameter: ``deepspeed.checkpoint.ds_to_universal``) into
``step_N/universal`` and loaded with ``"checkpoint": {"load_universal": true}``, which
re-partitions it for the new world. Unpartitioned state (ZeRO-0) loads at any world as is.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import List, Optional

import numpy as np
import torch
import torch.distributed as dist

from recipes.convert import TMP as UNIVERSAL_TMP, UNIVERSAL  # the converted copy inside a step dir (not in the manifest)

log = logging.getLogger("recipes.checkpoint")

DIRNAME = "checkpoints"
MANIFEST = "manifest.json"
# Fault injection for the tests only (tests/test_train.py): a save at this step exits abruptly
# with the save half done. Not a config field: no user run sets it.
TEST_CRASH_ENV = "RINGATTN_TEST_CRASH_IN_SAVE_AT_STEP"
_STEP_RE = re.compile(r"^step_(\d+)$")
_CHUNK = 1 << 24


class CheckpointError(RuntimeError):
    pass


def root(run_dir: str) -> str:
    return os.path.join(run_dir, DIRNAME)


def path_of(run_dir: str, step: int) -> str:
    return os.path.join(root(run_dir), f"step_{step:08d}")


# ---- the "stopped, not finished" marker of a run dir ----

# In the run dir while a run is stopped by a signal and not finished: written by rank 0 once the
# checkpoint of that step is complete, removed when a run starts (so a finished run never has
# it). launch/slurm.sbatch requeues a job only if it finds this file: under torchrun a
# signal-save and a crash both exit 1, and a signal during the last step lets the run finish.
STOPPED = "stopped.json"


def mark_stopped(run_dir: str, step: int, signal_name: str, max_steps: int, resume: str,
                 exit_status: int) -> None:
    """``exit_status``: 128 + the signal's number, the job's status the launch scripts return
    (the ranks of a launcher that watches them exit 0: ``recipes.train.exit_status``)."""
    _write_json(os.path.join(run_dir, STOPPED), {
        "stopped_by": signal_name, "step": step, "max_steps": max_steps, "finished": False,
        "exit_status": exit_status, "checkpoint": path_of(run_dir, step), "resume": resume})


def clear_stopped(run_dir: str) -> None:
    try:
        os.remove(os.path.join(run_dir, STOPPED))
    except FileNotFoundError:
        pass


def saved(run_dir: str) -> List[str]:
    """Paths of the renamed (committed) ``step_N`` dirs, newest first; not yet verified."""
    r = root(run_dir)
    if not os.path.isdir(r):
        return []
    found = sorted(((int(m.group(1)), name) for name in os.listdir(r) if (m := _STEP_RE.match(name))), reverse=True)
    return [os.path.join(r, name) for _, name in found]


def read_meta(path: str) -> dict:
    try:
        with open(os.path.join(path, "meta.json")) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path} is corrupt (meta.json unreadable: {e})") from e


def _differences(saved, now, key: str = "") -> dict:
    """``key: (saved, now)`` for each fact of ``now`` the checkpoint recorded otherwise. A fact the
    checkpoint did not record (written before it was a fact) is not compared; in a dict, only the
    keys of ``now`` count (a checkpoint may record more, e.g. options that were facts once)."""
    if isinstance(now, dict) and isinstance(saved, dict):
        out = {}
        for k, v in now.items():
            if k in saved:
                out.update(_differences(saved[k], v, f"{key}.{k}" if key else k))
        return out
    return {} if saved == now else {key: (saved, now)}


def check_compatible(path: str, meta: dict, expect: dict) -> None:
    """``expect``: the facts of this run that a checkpoint must match to be resumed."""
    diffs = _differences(meta, expect)
    if diffs:
        detail = "; ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in diffs.items())
        raise CheckpointError(f"checkpoint {path} is incompatible with this run ({detail}); "
                              "it was left untouched -- use another hydra.run.dir")


# ---- integrity: sizes and checksums, hashed in shares by all ranks ----

def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _files(path: str) -> List[str]:
    return sorted(n for n in os.listdir(path) if os.path.isfile(os.path.join(path, n)) and n != MANIFEST)


def _digest_share(path: str, names: List[str], rank: int, world: int) -> dict:
    return {n: {"bytes": os.path.getsize(os.path.join(path, n)), "sha256": _sha256(os.path.join(path, n))}
            for n in names[rank::world]}


def _gather(obj, world: int) -> list:
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def problems(path: str, rank: int, world: int, checksums: bool = True) -> List[str]:
    """What is wrong with a committed checkpoint (empty: complete). Every rank checks the sizes
    and checksums of its share of the manifest's files (``checksums=False``: sizes only)."""
    try:
        with open(os.path.join(path, MANIFEST)) as f:
            manifest = json.load(f)["files"]
    except (OSError, ValueError, KeyError) as e:
        return [f"{MANIFEST} unreadable ({type(e).__name__}: {e})"] if rank == 0 else []
    mine = []
    for name in sorted(manifest)[rank::world]:
        p, want = os.path.join(path, name), manifest[name]
        if not os.path.isfile(p):
            mine.append(f"{name} is missing")
        elif os.path.getsize(p) != want["bytes"]:
            mine.append(f"{name} has {os.path.getsize(p)} bytes, the manifest says {want['bytes']}")
        elif checksums and _sha256(p) != want["sha256"]:
            mine.append(f"{name} does not match its checksum")
    return mine


def latest_complete(run_dir: str) -> Optional[str]:
    """The newest checkpoint of ``run_dir`` whose manifest checks out, read by one process alone
    (evaluation, export); a corrupt newer one is skipped with a warning naming it. None: none."""
    for path in saved(run_dir):
        bad = problems(path, 0, 1)
        if not bad:
            return path
        log.warning("checkpoint %s is incomplete or corrupt (%s): skipping it", path, "; ".join(bad))
    return None


@dataclass
class Found:
    """The checkpoint a run resumes from, as rank 0 saw it and told every rank: ranks on a shared
    file system (NFS caches directory listings per client) must not decide each for itself."""

    path: str
    meta: dict
    files: List[str]  # the names in ``path``, listed by rank 0


def find_resumable(run_dir: str, expect: dict, rank: int, world: int) -> Optional[Found]:
    """The newest complete checkpoint of ``run_dir`` compatible with ``expect`` (None: none was
    ever saved). A collective, on every rank; the same answer everywhere: rank 0 alone lists the
    checkpoint directory and reads ``meta.json``.

    An incomplete or corrupt one is skipped with a warning naming it (the previous one is used);
    an incompatible one (another model, batch, seed or data) is an error: it is the config that
    is wrong, not the file. If checkpoints exist and none is complete, that is an error too --
    starting over silently would overwrite a run's metrics."""
    listing = _broadcast([(p, sorted(os.listdir(p))) for p in saved(run_dir)] if rank == 0 else None)
    rejected = []
    for path, files in listing:
        bad = sum(_gather(problems(path, rank, world), world), [])
        if not bad:
            answer = None
            if rank == 0:
                try:
                    meta = read_meta(path)
                    check_compatible(path, meta, expect)
                    answer = (None, meta)
                except CheckpointError as e:
                    answer = (str(e), None)
            err, meta = _broadcast(answer)
            if err:
                raise CheckpointError(err)
            return Found(path, meta, files)
        rejected.append(f"{os.path.basename(path)} ({'; '.join(bad)})")
        if rank == 0:
            log.warning("checkpoint %s is incomplete or corrupt (%s): it was left untouched; falling back to the "
                        "previous checkpoint", path, "; ".join(bad))
    if rejected:
        raise CheckpointError(f"no complete checkpoint in {root(run_dir)}: every one is corrupt: "
                              f"{', '.join(rejected)}; they were left untouched -- remove them to start over, "
                              "or use another hydra.run.dir")
    return None


def _broadcast(obj):
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# ---- save ----

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


def _write_json(path: str, obj) -> None:
    """Whole or not at all: a temporary file, fsync, rename."""
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)


def save(engine, run_dir: str, step: int, meta: dict, rank: int, world: int, keep: int = 0) -> str:
    """A collective. ``keep``: how many complete checkpoints to keep (0: all)."""
    r = root(run_dir)
    tmp_tag, tag = f".tmp-step_{step:08d}", f"step_{step:08d}"
    tmp = os.path.join(r, tmp_tag)
    if rank == 0:
        os.makedirs(r, exist_ok=True)
        # Saves run one at a time: any .tmp-step_* here was left by a save that crashed.
        for name in os.listdir(r):
            if name.startswith(".tmp-step_"):
                shutil.rmtree(os.path.join(r, name), ignore_errors=True)
    dist.barrier()
    engine.save_checkpoint(r, tag=tmp_tag, client_state={"step": step}, save_latest=False)
    torch.save(_rng_state(), os.path.join(tmp, f"rng_rank{rank:05d}.pt"))
    dist.barrier()
    if os.environ.get(TEST_CRASH_ENV) == str(step):
        os._exit(17)
    if rank == 0:
        _write_json(os.path.join(tmp, "meta.json"), dict(meta, step=step))
    # rank 0's listing for every rank (another client's view of a shared file system may lag);
    # the broadcast also orders meta.json before the hashing
    names = _broadcast(_files(tmp) if rank == 0 else None)
    shares = _gather(_digest_share(tmp, names, rank, world), world)
    if rank == 0:
        _write_json(os.path.join(tmp, MANIFEST), {"step": step, "files": {k: v for s in shares for k, v in s.items()}})
        final = os.path.join(r, tag)
        if os.path.exists(final):  # the same step saved again (a rerun past a deleted or corrupt later one)
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync_dir(r)
        retain(run_dir, final, keep)
    dist.barrier()
    return os.path.join(r, tag)


# ---- retention: run by rank 0 right after a save ----

def _step_of(path: str) -> int:
    return int(_STEP_RE.match(os.path.basename(path)).group(1))


def _aside(path: str, prefix: str) -> str:
    """Rename a checkpoint out of the ``step_N`` namespace (a resume no longer sees it); never
    deletes. Returns the new path (a numbered suffix if that name is taken)."""
    dst = os.path.join(os.path.dirname(path), prefix + os.path.basename(path))
    n = 1
    while os.path.exists(dst):
        dst = os.path.join(os.path.dirname(path), f"{prefix}{os.path.basename(path)}.{n}")
        n += 1
    os.rename(path, dst)
    return dst


def retain(run_dir: str, written: str, keep: int) -> None:
    """Retention after ``written`` was committed (rank 0 alone; the others wait at a barrier).

    - ``written`` is never deleted: it is the one checkpoint known good right now.
    - A ``step_N`` newer than it can only be one a resume skipped (corrupt or incomplete) or one
      of a trajectory this run has just replaced; left in place, a later resume would pick it or
      warn about it forever, and counting it could push ``written`` out. It is renamed aside to
      ``corrupt-step_N`` (``superseded-step_N`` if its files check out): kept for inspection,
      never resumed, never counted.
    - An older checkpoint counts only if it is complete (every file of its manifest present with
      its size: a stat, not a checksum, so retention stays cheap at any size; resume checks the
      checksums); an incomplete one is renamed aside like a newer one.
    - ``keep`` (0: all) counts copies on disk: a checkpoint's ``universal/`` conversion is as large
      as the checkpoint, so it counts as one more. When the budget runs out, an older
      checkpoint's universal copy goes first (it can be converted again), then the checkpoint."""
    step = _step_of(written)
    budget = keep - 1 if keep else None  # the one just written takes the first place
    for path in saved(run_dir):
        if path == written:
            continue
        bad = problems(path, 0, 1, checksums=False)
        if _step_of(path) > step or bad:
            prefix = "corrupt-" if bad else "superseded-"
            dst = _aside(path, prefix)
            why = "; ".join(bad) if bad else f"newer than step {step}, which this run continued from an earlier one"
            log.warning("checkpoint %s renamed aside to %s (%s): it is never resumed or counted -- remove it "
                        "when you no longer need it", path, os.path.basename(dst), why)
            continue
        if budget is None:
            continue
        copies = [os.path.join(path, d) for d in (UNIVERSAL, UNIVERSAL_TMP) if os.path.isdir(os.path.join(path, d))]
        if budget <= 0:
            shutil.rmtree(path, ignore_errors=True)
            continue
        budget -= 1
        for copy in copies:
            if budget > 0 and os.path.basename(copy) == UNIVERSAL:
                budget -= 1
            else:
                shutil.rmtree(copy, ignore_errors=True)


def _write_json_text(path: str, text: str) -> None:
    """A small text file, whole or not at all (as ``_write_json``)."""
    with open(path + ".tmp", "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---- load, on the same or another parallel shape ----

def _has_optimizer_shards(files: List[str]) -> bool:
    """Was the optimizer state saved split over ranks (ZeRO >= 1: one ``*_optim_states.pt`` per
    rank) rather than whole inside the model-states file (ZeRO-0, fp32 or bf16)?"""
    return any(n.endswith("_optim_states.pt") for n in files)


def needs_universal(path: str, meta: dict, world_size: int, zero_stage: int,
                    files: Optional[List[str]] = None) -> bool:
    """True if this checkpoint must be loaded through the universal format here; a clear error
    if it cannot be loaded at all in this configuration. ``files``: the names in ``path`` as rank
    0 listed them (``Found.files``), so every rank decides alike; None: list ``path`` here."""
    saved_stage = meta["zero_stage"]
    if _has_optimizer_shards(os.listdir(path) if files is None else files) != (zero_stage >= 1):
        raise CheckpointError(
            f"checkpoint {path} was saved with deepspeed.zero_stage={saved_stage}; resuming it with "
            f"zero_stage={zero_stage} would move between whole and partitioned optimizer state, which "
            "DeepSpeed cannot convert: keep zero_stage 0, or >= 1 (any world size works)")
    if zero_stage == 0 or (meta["world_size"] == world_size and saved_stage == zero_stage):
        return False
    if (saved_stage == 3) != (zero_stage == 3):
        raise CheckpointError(
            f"checkpoint {path} was saved with deepspeed.zero_stage={saved_stage}; DeepSpeed's universal "
            f"loader cannot take it to zero_stage={zero_stage} (ZeRO-3 and ZeRO-1/2 keep different "
            "layouts): keep ZeRO-3, or stay within 1 and 2 (any world size works)")
    return True


def to_universal(path: str, rank: int, poll_s: float = 1.0) -> str:
    """Convert once into ``path/universal`` (rank 0); returns that path. Every rank calls it.

    Rank 0 runs ``python -m recipes.convert`` as a child process: a process without this one's
    process-group threads may fork, so the conversion runs on every CPU of the node, and it
    continues an interrupted conversion where it stopped (``recipes.convert``). The others do
    not wait in a collective: a conversion reads and writes the whole optimizer state (12-16
    bytes per parameter) and takes as long as that takes, which a barrier would cut off at the
    collective timeout. They poll a key of the rendezvous store, which no collective timeout
    bounds, and fail with rank 0's reason if the conversion fails."""
    out = os.path.join(path, UNIVERSAL)
    key = f"ringattn/universal/{os.path.basename(path)}"
    # the process group's store (the same TCPStore its ranks rendezvoused through)
    store = dist.distributed_c10d._get_default_store()
    if rank == 0:
        try:
            if not os.path.isdir(out):
                _convert_in_child(path)
        except BaseException as e:
            store.set(key, f"failed: {e}")
            raise
        store.set(key, "done")
        return out
    t0 = last = time.monotonic()
    while not store.check([key]):
        if time.monotonic() - last >= 60 or last == t0:
            log.info("rank %d: waiting for rank 0 to convert %s to the universal format (%.0f s so far)",
                     rank, path, time.monotonic() - t0)
            last = time.monotonic()
        time.sleep(poll_s)
    answer = store.get(key).decode()
    if answer != "done":
        raise CheckpointError(f"rank 0 could not convert checkpoint {path} to the universal format ({answer}); "
                              "the checkpoint was left untouched")
    return out


def _convert_in_child(path: str) -> None:
    """``python -m recipes.convert path``; its log goes to this process's stderr, and its last
    line is the reason if it fails."""
    log.info("converting %s to DeepSpeed's universal format for a new parallel shape", path)
    child = subprocess.Popen([sys.executable, "-m", "recipes.convert", path], stderr=subprocess.PIPE, text=True)
    last = ""
    for line in child.stderr:
        sys.stderr.write(line)
        last = line.strip() or last
    if child.wait() != 0:
        raise CheckpointError(f"converting checkpoint {path} failed (python -m recipes.convert exited "
                              f"{child.returncode}: {last}); the checkpoint was left untouched, and the next "
                              "attempt continues the conversion")


def load(engine, path: str, rank: int, universal: bool = False) -> None:
    """Load model, optimizer, scheduler and RNG from a complete checkpoint. ``universal``: from
    its converted copy (the engine was built with ``"checkpoint": {"load_universal": true}``)."""
    load_from = os.path.join(path, UNIVERSAL) if universal else path
    try:
        load_path, _ = engine.load_checkpoint(os.path.dirname(load_from), tag=os.path.basename(load_from))
    except Exception as e:  # DeepSpeed raises anything from torch.load / key errors
        raise CheckpointError(f"checkpoint {path} could not be loaded ({type(e).__name__}: {e}); "
                              "it was left untouched -- remove it or use another hydra.run.dir") from e
    if load_path is None:
        raise CheckpointError(f"checkpoint {path} could not be loaded (DeepSpeed found no state); "
                              "it was left untouched")
    # This rank's RNG if it saved one; at another world size, rank 0's (the recipe draws nothing
    # random per rank in a step, so this only keeps later draws reproducible).
    rng = os.path.join(path, f"rng_rank{rank:05d}.pt")
    if not os.path.exists(rng) or universal:
        rng = os.path.join(path, "rng_rank00000.pt")
    _set_rng_state(torch.load(rng, weights_only=False))
