"""launch/slurm.sbatch requeues a job exactly when the run was stopped by the time-limit signal:
the batch script under stand-in ``srun`` / ``scontrol`` commands, with a stand-in ``python`` that
answers USR1 the way the recipe can (save and stop, or finish anyway, or fail) -- seconds, no
training. The real recipe writing and clearing the marker is checked end to end in
tests/test_launch.py and tests/test_preemption.py."""
from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from recipes.checkpoint import STOPPED
from tests.test_launch import LAUNCH, finish, start, wait_for
from tests.train_launch import REPO

# srun: its tasks, forwarding USR1/TERM to them (as srun does); scontrol: records a requeue.
SRUN = '''#!/usr/bin/env bash
while [[ "$1" == -* ]]; do shift; done
pids=()
for s in USR1 TERM; do trap "echo $s >> \\"\\$SRUN_GOT\\"; kill -s $s \\${pids[*]} 2>/dev/null" $s; done
for ((i=0; i<SLURM_NTASKS; i++)); do SLURM_PROCID=$i SLURM_LOCALID=$i "$@" & pids+=($!); done
rc=0; for p in "${pids[@]}"; do
  while true; do wait "$p" && r=0 || r=$?; kill -0 "$p" 2>/dev/null || break; done
  [[ $r == 0 ]] || rc=$r
done; exit $rc
'''
# python -m recipes.train ... hydra.run.dir=D: "started" in D, then on USR1 what ON_USR1 says
PYTHON = f'''#!/usr/bin/env bash
for a in "$@"; do case "$a" in hydra.run.dir=*) dir="${{a#hydra.run.dir=}}" ;; esac; done
mkdir -p "$dir"
on_usr1() {{
  case "$ON_USR1" in
    # the ranks of a launcher exit 0 after a signal-save; the marker holds the job's status
    stop) [[ "$SLURM_PROCID" == 0 ]] && echo '{{"step": 7, "finished": false, "exit_status": 138}}' > "$dir/{STOPPED}"; exit 0 ;;
    finish) exit 0 ;;   # the signal came during the last step: the run completes
    crash) exit 1 ;;    # failed while saving: no marker
  esac
}}
trap on_usr1 USR1
trap 'echo TERM >> "$dir/got.$SLURM_PROCID"; on_usr1' TERM
touch "$dir/started.$SLURM_PROCID"
while true; do sleep 0.05; done
'''


def _run_sbatch(tmp_path: Path, on_usr1: str, stale_marker: bool = False, args=(),
                sig: str = "USR1") -> tuple[int, str, bool]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    requeued = tmp_path / "requeued"
    for name, text in (("srun", SRUN), ("python", PYTHON),
                       ("scontrol", f'#!/usr/bin/env bash\nif [[ "$1" == requeue ]]; then echo "$@" >> {requeued}; '
                                    'else echo localhost; fi\n')):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    cwd = tmp_path / "job"
    run_dir = cwd / next((a.split("=", 1)[1] for a in args if a.startswith("hydra.run.dir=")), "outputs/slurm-77")
    if stale_marker:  # left by an earlier job of this run dir that was stopped and requeued
        run_dir.mkdir(parents=True)
        (run_dir / STOPPED).write_text('{"step": 3, "finished": false}')
    env = dict(LAUNCHER="srun", SLURM_JOB_ID="77", SLURM_JOB_NODELIST="localhost", SLURM_NTASKS="2",
               SLURM_NNODES="1", SLURM_SUBMIT_DIR=str(REPO), ON_USR1=on_usr1, PATH=f"{bin_dir}:{os.environ['PATH']}",
               SRUN_GOT=str(tmp_path / "srun_got"))
    job = start(["bash", LAUNCH / "slurm.sbatch", "trainer.max_steps=40", *args], cwd, env)
    wait_for(lambda: all((run_dir / f"started.{i}").exists() for i in (0, 1)), job, 60, "both tasks")
    if sig == "USR1":
        os.kill(job.pid, signal.SIGUSR1)  # what --signal=B:USR1@N does before the time limit
    else:  # preemption or the time limit: SLURM sends SIGTERM to every process of the job
        os.killpg(job.pid, signal.SIGTERM)
    rc, out = finish(job, 60)
    return rc, out, requeued.exists() and requeued.read_text().split() == ["requeue", "77"]


def test_usr1_that_stops_the_run_requeues(tmp_path):
    rc, out, requeued = _run_sbatch(tmp_path, "stop")
    assert rc == 138 and requeued, out
    assert "requeueing job 77" in out and '"step": 7' in out, out


@pytest.mark.parametrize("on_usr1, stale_marker", [("finish", False), ("crash", True)])
def test_usr1_without_a_stop_of_this_job_does_not_requeue(tmp_path, on_usr1, stale_marker):
    """USR1 during the last step (the run finishes, exit 0), or a run that fails while saving
    (no marker of its own; an earlier job's marker is still in the run dir): no requeue."""
    rc, out, requeued = _run_sbatch(tmp_path, on_usr1, stale_marker)
    assert rc == (0 if on_usr1 == "finish" else 1), out
    assert not requeued, out
    assert "not requeueing job 77" in out, out
    assert not (tmp_path / "job" / "outputs" / "slurm-77" / STOPPED).exists()


def test_the_marker_is_looked_for_in_a_hydra_run_dir_override(tmp_path):
    rc, out, requeued = _run_sbatch(tmp_path, "stop", args=["hydra.run.dir=runs/mine"])
    assert rc == 138 and requeued, out
    assert not (tmp_path / "job" / "outputs").exists()


def test_sigterm_from_slurm_is_not_passed_on_a_second_time(tmp_path):
    """SLURM signals every process of a preempted job itself: the batch script adds no second
    SIGTERM (which would cut torchrun's graceful wait short); the job ends with the marker's
    status and SLURM, not the script, requeues it."""
    rc, out, requeued = _run_sbatch(tmp_path, "stop", sig="TERM")
    assert (tmp_path / "srun_got").read_text().split() == ["TERM"], out  # SLURM's own, once
    run_dir = tmp_path / "job" / "outputs" / "slurm-77"
    # every task got SLURM's SIGTERM (and, racing with its exit, perhaps srun's forward of it)
    assert all("TERM" in (run_dir / f"got.{i}").read_text().split() for i in (0, 1)), out
    assert rc == 138 and not requeued, out
