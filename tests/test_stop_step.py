"""A stop step (trainer.stop_at_step, or a signal) saves a checkpoint whatever save_every, before
the step's evaluation and logging; the recipe end to end in one process."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from recipes.checkpoint import STOPPED
from tests.train_launch import FAST, REPO, clean_env, metrics, train_ok


@pytest.mark.slow
def test_stop_at_step_saves_without_save_every_first_then_evaluates_and_the_rerun_resumes(tmp_path):
    over = ["trainer.max_steps=4", "trainer.save_every=0", "trainer.eval_every=2", "trainer.seed=3"]
    # stdout and stderr in one pipe: the order of the log lines is the order of the events
    proc = subprocess.run([sys.executable, "-m", "recipes.train", *FAST, *over, "trainer.stop_at_step=2",
                           f"hydra.run.dir={tmp_path}"], cwd=REPO, env=clean_env(), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=240)
    out = proc.stdout
    assert proc.returncode == 0, out[-3000:]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_00000002"], out[-3000:]
    saved, logged = out.find("stopped at step 2 of 4"), out.find("step 2/4 | loss")
    assert 0 <= saved < logged, "the checkpoint is saved before the step's evaluation and logging\n" + out[-3000:]
    assert "accuracy" in metrics(tmp_path)[2], "the evaluation still runs after the save"
    assert f"hydra.run.dir={tmp_path} to resume" in out
    assert not (tmp_path / STOPPED).exists(), "a planned stop is not an interrupted run"
    proc = train_ok(tmp_path, 1, over)
    assert "at step 2" in proc.stderr and sorted(metrics(tmp_path)) == [1, 2, 3, 4]


@pytest.mark.slow
def test_the_override_printed_on_a_signal_stop_resumes_a_launch_script_run(tmp_path):
    """launch/torchrun_single_node.sh without hydra.run.dir: the run dir is outputs/<torchrun's
    run id>, new for every invocation, so rerunning the bare command starts over. On a signal
    stop the recipe prints the override that resumes; rerunning with it continues the run."""
    import os
    import re
    import signal

    from tests.test_launch import LAUNCH, finish, only_run_dir, start, wait_for

    cmd = [LAUNCH / "torchrun_single_node.sh", *FAST, "trainer.max_steps=400", "trainer.seed=3"]
    env = {"NPROC_PER_NODE": "1", "SHUTDOWN_TIMEOUT": "60"}
    agent = start(cmd, tmp_path, env)
    wait_for(lambda: any(p.stat().st_size for p in tmp_path.glob("outputs/*/metrics.jsonl")), agent, 180,
             "the first logged step")
    os.kill(agent.pid, signal.SIGTERM)
    rc, out = finish(agent, 120)
    run_dir = only_run_dir(tmp_path)
    hint = re.search(r"rerun the same command with (hydra\.run\.dir=\S+) to resume", out)
    assert rc != 0 and hint, out[-3000:]
    assert hint.group(1) == f"hydra.run.dir={run_dir}", hint.group(1)
    saved = int(json.loads((run_dir / STOPPED).read_text())["step"])
    rc, out = finish(start([*cmd, hint.group(1), f"trainer.stop_at_step={saved + 2}"], tmp_path, env), 180)
    assert rc == 0, out[-3000:]
    assert f"at step {saved}" in out and only_run_dir(tmp_path) == run_dir, out[-3000:]
    assert sorted(metrics(run_dir))[-1] == saved + 2
