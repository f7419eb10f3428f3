#!/usr/bin/env python
"""A sweep of distributed runs: one launcher invocation (torchrun by default) per sweep point.

    python launch/sweep.py --nproc-per-node 2 -- parallel.sp_size=2 optim.lr=1e-3,3e-3 trainer.seed=0,1
    python launch/sweep.py --sweep-dir multirun/lr --launcher launch/deepspeed_hostfile.sh -- optim.lr=1e-3,3e-3

Hydra's ``--multirun`` runs its jobs one after another *inside* one process, so under
torchrun every rank would run its own sweep loop, resolve its own sweep dir, and reuse one
process group for all jobs: it does not mix. Here the sweep is expanded once, with Hydra's
own override grammar (``a=1,2``, ``range(...)``, ``choice(...)``; the cartesian product like
``--multirun``), and each point is a separate job in ``<sweep-dir>/<n>`` -- Hydra's
multirun layout. ``<sweep-dir>/sweep.jsonl`` records each point's overrides and exit code.
Rerunning the same command with the same ``--sweep-dir`` resumes every point from its own
checkpoints (finished points only reload).
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def expand(overrides: list[str]) -> list[list[str]]:
    """Hydra override strings -> one override list per sweep point (cartesian product)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    axes = []
    for o in OverridesParser.create().parse_overrides(overrides):
        if o.is_sweep_override():
            axes.append([f"{o.get_key_element()}={v}" for v in o.sweep_string_iterator()])
        else:
            axes.append([o.input_line])
    return [list(p) for p in itertools.product(*axes)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nproc-per-node", type=int, default=None, help="NPROC_PER_NODE for the launcher")
    ap.add_argument("--sweep-dir", default=None, help="default multirun/<date_time>")
    ap.add_argument("--launcher", default=os.path.join(HERE, "torchrun_single_node.sh"),
                    help="a launch/ script that passes Hydra overrides through (default: single-node torchrun)")
    ap.add_argument("--keep-going", action="store_true", help="run the remaining points after a failure")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides, with sweeps (after --)")
    args = ap.parse_args(argv)
    if any(o.startswith(("hydra.run.dir=", "hydra.sweep.")) for o in args.overrides):
        ap.error("the sweep sets each point's hydra.run.dir to <sweep-dir>/<n>; use --sweep-dir")
    points = expand(args.overrides)
    sweep_dir = args.sweep_dir or os.path.join("multirun", time.strftime("%Y-%m-%d_%H-%M-%S"))
    os.makedirs(sweep_dir, exist_ok=True)
    env = dict(os.environ)
    if args.nproc_per_node:
        env["NPROC_PER_NODE"] = str(args.nproc_per_node)
    failed = 0
    print(f"sweep: {len(points)} points in {sweep_dir}", flush=True)
    for n, point in enumerate(points):
        run_dir = os.path.join(sweep_dir, str(n))
        print(f"sweep [{n + 1}/{len(points)}] {run_dir}: {' '.join(point)}", flush=True)
        env.pop("TORCHELASTIC_RUN_ID", None)
        rc = subprocess.call([args.launcher, *point, f"hydra.run.dir={run_dir}"], env=env)
        with open(os.path.join(sweep_dir, "sweep.jsonl"), "a") as f:
            f.write(json.dumps({"job": n, "run_dir": run_dir, "overrides": point, "returncode": rc}) + "\n")
        if rc != 0:
            failed += 1
            print(f"sweep: point {n} failed (exit {rc})", file=sys.stderr, flush=True)
            if not args.keep_going:
                return rc
    print(f"sweep: done, {len(points) - failed}/{len(points)} points succeeded", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
