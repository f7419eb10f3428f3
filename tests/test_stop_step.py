"""A stop step (trainer.stop_at_step, or a signal) saves a checkpoint whatever save_every, before
the step's evaluation and logging; the recipe end to end in one process."""
from __future__ import annotations

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
