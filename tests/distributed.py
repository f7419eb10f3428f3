"""Run a function on P real processes (gloo on CPU, NCCL on GPUs) without ever hanging.

    results = run_distributed(fn, world_size, *args, backend="gloo", timeout=120)

``fn(rank, world_size, *args)`` runs in a fresh spawned process with the default process
group initialised through a FileStore in a fresh temporary directory (no port to race for);
its return values come back as a list by rank.
If any rank raises, the others are stopped and an AssertionError names the rank and shows
its traceback; if the ranks do not all finish within ``timeout`` seconds, the ones still
running are killed and named.
"""
from __future__ import annotations

import datetime
import os
import pickle
import queue
import shutil
import tempfile
import time
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _worker(rank, world_size, store_path, backend, timeout, fn, args, results):
    try:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
        if backend == "nccl":
            torch.cuda.set_device(rank)
        dist.init_process_group(
            backend, store=dist.FileStore(store_path, world_size), rank=rank, world_size=world_size,
            timeout=datetime.timedelta(seconds=timeout),
        )
        value = fn(rank, world_size, *args)
        # Plain pickle copies tensor data: the queue's own pickler would share storages
        # through a file descriptor this process may close (exit) before the parent reads it.
        results.put((rank, True, pickle.dumps(value)))
    except BaseException:  # noqa: BLE001 - report everything, including KeyboardInterrupt
        results.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(fn, world_size: int, *args, backend: str = "gloo", timeout: float = 120):
    if backend == "nccl" and torch.cuda.device_count() < world_size:
        raise RuntimeError(f"NCCL run needs {world_size} GPUs, found {torch.cuda.device_count()}")
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    store_dir = tempfile.mkdtemp(prefix="ringattn-store-")
    store_path = os.path.join(store_dir, "store")
    procs = [
        ctx.Process(target=_worker, args=(r, world_size, store_path, backend, timeout, fn, args, results),
                    daemon=True)
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    values, failures = {}, {}
    deadline = time.monotonic() + timeout
    try:
        while len(values) + len(failures) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                rank, ok, value = results.get(timeout=min(remaining, 1.0))
            except queue.Empty:
                dead = [r for r, p in enumerate(procs)
                        if p.exitcode not in (None, 0) and r not in values and r not in failures]
                for r in dead:
                    failures[r] = f"process exited with code {procs[r].exitcode} without reporting"
                continue
            (values if ok else failures)[rank] = pickle.loads(value) if ok else value
            if failures:
                break  # one rank failed: the others may be blocked on it
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join(timeout=10)
        results.close()
        results.join_thread()
        shutil.rmtree(store_dir, ignore_errors=True)
    if failures:
        first = min(failures)
        raise AssertionError(
            f"rank {first} of {world_size} failed ({len(failures)} failed in all):\n{failures[first]}"
        )
    missing = [r for r in range(world_size) if r not in values]
    if missing:
        raise AssertionError(f"ranks {missing} of {world_size} did not finish within {timeout}s (killed)")
    return [values[r] for r in range(world_size)]


QUICK_WORLD = 2  # the quick tier (-m "not slow") runs multi-process tests at this many ranks


def worlds(*sizes, quick=None):
    """pytest params for a world-size parametrization: sizes outside ``quick`` (default: those
    <= ``QUICK_WORLD``) are marked ``slow`` (the full suite runs them; the quick tier keeps the
    small ones of the same test)."""
    import pytest

    quick = {w for w in sizes if w <= QUICK_WORLD} if quick is None else set(quick)
    return [pytest.param(w, id=str(w), marks=[] if w in quick else [pytest.mark.slow]) for w in sizes]


def world_and_backend(worlds, quick=None):
    """pytest params (world, backend): gloo always; nccl where >= world GPUs exist (so one
    GPU already runs world 1 on CUDA), skipped with the reason otherwise. gloo worlds outside
    ``quick`` (default: <= ``QUICK_WORLD``) are slow."""
    import pytest

    gpus = torch.cuda.device_count()
    quick = {w for w in worlds if w <= QUICK_WORLD} if quick is None else set(quick)
    params = []
    for w in worlds:
        params.append(pytest.param(w, "gloo", id=f"{w}-gloo",
                                   marks=[] if w in quick else [pytest.mark.slow]))
        params.append(pytest.param(w, "nccl", id=f"{w}-nccl", marks=pytest.mark.skipif(
            gpus < w, reason=f"NCCL with {w} ranks needs {w} GPUs; this machine has {gpus}")))
    return params
