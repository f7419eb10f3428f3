"""Convert a checkpoint to DeepSpeed's universal format: in parallel, and resumable.

    python -m recipes.convert outputs/run/checkpoints/step_00000200     # one checkpoint
    python -m recipes.convert outputs/run --workers 16                  # the run's newest one

A reshape-resume (another world size or ZeRO stage 1 <-> 2) loads the optimizer state through
DeepSpeed's universal format (``recipes.checkpoint.needs_universal``). The recipe converts on
rank 0 by running this module as a child process; run it yourself before the job starts (on
any machine that sees the checkpoint, e.g. a CPU node) and the job finds ``step_N/universal``
ready.

The work is DeepSpeed's own (``deepspeed.checkpoint.ds_to_universal``, whose worker functions
do every read and write), cut into units with a journal:

- extraction: one unit per data-parallel rank's optimizer file (its fp32 master weights and
  Adam moments, split into one fragment per parameter);
- merge: one unit per parameter (its fragments joined into ``zero/<name>/{fp32,exp_avg,
  exp_avg_sq,step}.pt``).

Units run on ``--workers`` processes. The child process has no process-group threads, so the
pool may fork (forking the training process itself deadlocked its children). Every unit only
overwrites its own files, so a unit cut off part way is simply run again: the journal
(``.tmp-universal/units.done``) records each unit once it is complete, and a conversion that
was interrupted (a crash, a restart, a time limit) continues with the units not yet done.
The finished conversion is renamed to ``universal`` in one step, so ``universal`` exists only
complete.

Why not ``ds_to_universal.main`` as is: it always begins again from nothing and, run inside
a training process, can only use one worker. Checkpoints with tensor or pipeline parallelism
or AutoEP experts (the recipe writes none) go to ``main`` unchanged, in one pass.
"""
from __future__ import annotations

import argparse
import logging
import multiprocessing
import os
import shutil
import sys
import time
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from typing import Callable, Dict, List, Optional

log = logging.getLogger("recipes.convert")

UNIVERSAL = "universal"  # the converted copy inside a step dir
TMP = ".tmp-" + UNIVERSAL  # the conversion in progress, kept across attempts
JOURNAL = "units.done"
FRAGMENTS = "tmp"  # ds_to_universal's name for its fragment folder inside the output

# ds_to_universal's functions this driver calls (deepspeed 0.19.8). Without any of them the
# conversion falls back to ds_to_universal.main: correct, but in one pass, not resumable.
_NEEDED = ("DeepSpeedCheckpoint", "_inject_missing_state", "_check_for_required_state",
           "_aggregate_autoep_zero12_metadata", "_group_per_tp_shapes", "extract_zero_shards",
           "merge_tp_slices", "_save_optimizer_state", "_get_optim_files", "_filter_zero3_optim_files",
           "_get_zero_stage", "_get_zero3_model_state_files", "_parse_model_states_stage3",
           "_build_zero3_rank_grid", "extract_zero_shards_stage3", "merge_zero3_slices",
           "_save_optimizer_state_stage3", "_is_expert_model_state_file", "_autoep_expert_param_names_by_rank")


class Job:
    """One conversion: its units (name -> argument of ``run``) and what finishes it."""

    def __init__(self, units: Dict[str, tuple], run: Callable, finish: Callable[[], None]):
        self.units, self.run, self.finish = units, run, finish


_JOB: Optional[Job] = None  # set before the pool forks: workers inherit it, nothing is pickled


def _run_unit(name: str) -> str:
    _JOB.run(*_JOB.units[name])
    return name


def _journal(tmp: str) -> set:
    path = os.path.join(tmp, JOURNAL)
    if not os.path.exists(path):
        return set()
    with open(path) as f:
        return {line.rstrip("\n") for line in f if line.endswith("\n")}  # a torn last line: not done


def _record(journal, name: str) -> None:
    journal.write(name + "\n")
    journal.flush()
    os.fsync(journal.fileno())


def default_workers() -> int:
    """The CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _zero12_job(ds, path: str, tmp: str) -> Optional[Job]:
    ckpt = ds.DeepSpeedCheckpoint(path)
    ds._inject_missing_state(ckpt)  # our module declares no tensor-parallel layout: a plain one
    ds._check_for_required_state(ckpt)
    shapes_by_tp, autoep, _ = ds._aggregate_autoep_zero12_metadata(ckpt.model_state_metadata)
    if autoep is not None or ckpt.tp_degree != 1 or ckpt.pp_degree != 1:
        return None
    shapes = ds._group_per_tp_shapes(shapes_by_tp, 1, 1)
    info = ckpt.get_checkpoint_info(ds.UNIVERSAL_CHECKPOINT_INFO)
    frag, zero = os.path.join(tmp, FRAGMENTS), os.path.join(tmp, "zero")
    units = {f"extract dp {dp}": ("extract", (0, 0, dp)) for dp in range(ckpt.dp_degree)}
    units.update({f"merge {name}": ("merge", (name, s)) for name, s in sorted(shapes.items())})

    def run(kind, arg):
        if kind == "extract":
            ds.extract_zero_shards(frag, ckpt, arg)
        else:
            unmatched = ds.merge_tp_slices(info, zero, frag, 1, arg)
            # ds_to_universal (strict) asserts that every TP pattern was used by some parameter;
            # a checkpoint without tensor parallelism declares none
            assert not unmatched, f"tensor-parallel patterns {unmatched} in a checkpoint without TP"

    def finish():
        import torch

        # ZeRO makes no fragments for a parameter that never had a gradient; its weights come
        # from the model states (as ds_to_universal.main does)
        for model_file in ckpt.mp_rank_files:
            module = torch.load(model_file, map_location="cpu", weights_only=False).get("module") or {}
            for name, tensor in module.items():
                fp32 = os.path.join(zero, name, "fp32.pt")
                if not os.path.isfile(fp32):
                    os.makedirs(os.path.dirname(fp32), exist_ok=True)
                    torch.save({ds.PARAM: tensor.float()}, fp32)
        ds._save_optimizer_state(argparse.Namespace(output_folder=tmp), ckpt)
        for f in ckpt.mp_rank_files:
            shutil.copy2(f, tmp)

    return Job(units, run, finish)


def _zero3_job(ds, path: str, tmp: str, optim_files: List[str]) -> Optional[Job]:
    model_files = ds._get_zero3_model_state_files(path)
    expert_names, _ = ds._autoep_expert_param_names_by_rank(model_files)
    _, tp, dp = ds._build_zero3_rank_grid(model_files)
    optim_grid, tp_o, dp_o = ds._build_zero3_rank_grid(optim_files)
    if expert_names or tp != 1 or (tp_o, dp_o) != (tp, dp):
        return None
    param_shapes = ds._parse_model_states_stage3(model_files)
    frag, zero = os.path.join(tmp, FRAGMENTS), os.path.join(tmp, "zero")
    names = sorted({k for group in param_shapes for k in group})
    units = {f"extract dp {d}": ("extract", (0, d)) for d in range(dp)}
    units.update({f"merge {name}": ("merge", name) for name in names})

    def run(kind, arg):
        if kind == "extract":
            ds.extract_zero_shards_stage3(optim_grid, [param_shapes], dp, frag, arg)
        else:
            ds.merge_zero3_slices(dp, zero, frag, arg)

    def finish():
        ds._save_optimizer_state_stage3(argparse.Namespace(output_folder=tmp), optim_files)
        for f in sorted(os.listdir(path)):
            full = os.path.join(path, f)
            if f.endswith("model_states.pt") and not ds._is_expert_model_state_file(full):
                shutil.copy2(full, tmp)

    return Job(units, run, finish)


def _job(ds, path: str, tmp: str) -> Optional[Job]:
    if any(not hasattr(ds, n) for n in _NEEDED):
        return None
    optim_files = ds._get_optim_files(path)
    zero3_files = ds._filter_zero3_optim_files(optim_files)
    if ds._get_zero_stage(zero3_files or optim_files) > 2 and zero3_files:
        return _zero3_job(ds, path, tmp, zero3_files)
    return _zero12_job(ds, path, tmp)


def _run_units(job: Job, tmp: str, workers: int) -> None:
    global _JOB
    done = _journal(tmp)
    todo = [n for n in job.units if n not in done]
    # every merge needs every extraction: two phases
    phases = [[n for n in todo if n.startswith("extract")], [n for n in todo if n.startswith("merge")]]
    if done:
        log.info("resuming a conversion: %d of %d units were done before", len(job.units) - len(todo),
                 len(job.units))
    t0, finished = time.monotonic(), len(job.units) - len(todo)
    _JOB = job
    with open(os.path.join(tmp, JOURNAL), "a") as journal:
        for phase in phases:
            if not phase:
                continue
            if workers <= 1:
                for name in phase:
                    _run_unit(name)
                    _record(journal, name)
                continue
            with ProcessPoolExecutor(min(workers, len(phase)), mp_context=multiprocessing.get_context("fork")) as pool:
                futures = [pool.submit(_run_unit, n) for n in phase]
                pending = set(futures)
                while pending:
                    complete, pending = wait(pending, timeout=60, return_when=FIRST_EXCEPTION)
                    for f in complete:
                        _record(journal, f.result())  # a failed unit raises here
                    finished += len(complete)
                    log.info("converted %d of %d units (%.0f s)", finished, len(job.units), time.monotonic() - t0)
    _JOB = None


def convert(path: str, workers: int = 1) -> str:
    """Convert the checkpoint in ``path`` (a step dir) into ``path/universal``; returns that
    path. Continues an interrupted conversion; does nothing if ``universal`` exists."""
    from deepspeed.checkpoint import ds_to_universal as ds

    out, tmp = os.path.join(path, UNIVERSAL), os.path.join(path, TMP)
    if os.path.isdir(out):
        return out
    os.makedirs(tmp, exist_ok=True)
    # DeepSpeedCheckpoint lists model-state files in all of ``path``, subfolders included: the
    # copies a finishing attempt made in ``tmp`` would count twice (they are copied again last)
    for name in os.listdir(tmp):
        if name.endswith("_states.pt"):
            os.remove(os.path.join(tmp, name))
    t0 = time.monotonic()
    job = _job(ds, path, tmp)
    if job is None:  # a layout this driver does not cut into units: DeepSpeed's one pass
        log.info("converting %s with ds_to_universal.main (one pass, not resumable)", path)
        shutil.rmtree(tmp)
        ds.main(argparse.Namespace(input_folder=path, output_folder=tmp, num_extract_workers=workers,
                                   num_merge_workers=workers, keep_temp_folder=False, strict=True,
                                   inject_missing_state=True))
    else:
        log.info("converting %s to the universal format: %d units on %d worker(s)", path, len(job.units), workers)
        _run_units(job, tmp, workers)
        job.finish()
        shutil.rmtree(os.path.join(tmp, FRAGMENTS), ignore_errors=True)
        os.remove(os.path.join(tmp, JOURNAL))
    os.rename(tmp, out)
    # <step dir>/latest_universal names the converted folder (ds_to_universal.main writes it
    # next to its output, which was the temporary name)
    with open(os.path.join(path, "latest_universal"), "w") as f:
        f.write(UNIVERSAL)
    log.info("converted %s in %.1f s", path, time.monotonic() - t0)
    return out


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m recipes.convert", description=__doc__.split("\n\n")[0])
    parser.add_argument("path", help="a checkpoint (run_dir/checkpoints/step_N) or a run dir (its newest "
                                     "complete checkpoint)")
    parser.add_argument("--workers", type=int, default=default_workers(),
                        help="processes converting units in parallel (default: this machine's CPUs)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    path = args.path.rstrip("/")
    if not os.path.basename(path).startswith("step_"):
        from recipes import checkpoint

        newest = checkpoint.latest_complete(path)
        if newest is None:
            parser.error(f"{path}: no complete checkpoint found (give a step_N dir or a run dir)")
        path = newest
    if args.workers < 1:
        parser.error(f"--workers must be >= 1, got {args.workers}")
    convert(path, args.workers)
    return 0


if __name__ == "__main__":
    sys.exit(main())
