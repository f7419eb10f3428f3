"""A resumed job continues its W&B run from the checkpoint's step, not from wherever the crashed
job stopped logging: the arguments the Tracker gives ``wandb.init`` (recorded, nothing sent)."""
from __future__ import annotations

import json

import pytest

from recipes import tracking
from recipes.tracking import LoggerConfig, Tracker


@pytest.fixture
def inits(monkeypatch):
    wandb = pytest.importorskip("wandb")
    calls = []

    class _Run:
        def log(self, metrics, step):
            pass

        def finish(self):
            pass

    monkeypatch.setattr(wandb, "init", lambda **kw: calls.append(kw) or _Run())
    return calls


def _job(tmp_path, resume_step: int, **cfg) -> dict:
    t = Tracker(LoggerConfig(backend=tracking.Backend.wandb, **cfg), str(tmp_path), {"x": 1}, resume_step=resume_step)
    t.close()
    return t


def test_a_resumed_job_rewinds_its_wandb_run_to_the_checkpoints_step(tmp_path, inits):
    _job(tmp_path, 0)
    first = inits[-1]
    assert "resume" not in first and "resume_from" not in first
    run_id = (tmp_path / tracking.RUN_ID_FILE).read_text()
    assert first["id"] == run_id
    # the job logged up to step 13, then crashed; its newest checkpoint is step 8
    (tmp_path / tracking.METRICS).write_text("".join(json.dumps({"step": s}) + "\n" for s in range(1, 14)))
    _job(tmp_path, 8)
    again = inits[-1]
    assert again["id"] == run_id and again["resume_from"] == f"{run_id}?_step=8", again
    assert "resume" not in again, "resume and resume_from are mutually exclusive in wandb.init"
    assert [json.loads(ln)["step"] for ln in (tmp_path / tracking.METRICS).read_text().splitlines()] == \
        list(range(1, 9))


def test_fork_starts_a_new_run_from_the_checkpoints_step_and_append_keeps_the_old_behaviour(tmp_path, inits):
    from recipes.tracking import WandbResume

    _job(tmp_path, 0)
    old = (tmp_path / tracking.RUN_ID_FILE).read_text()
    _job(tmp_path, 5, resume=WandbResume.fork)
    fork = inits[-1]
    assert fork["fork_from"] == f"{old}?_step=5" and fork["id"] != old, fork
    assert (tmp_path / tracking.RUN_ID_FILE).read_text() == fork["id"], "the next resume continues the fork"
    _job(tmp_path, 7, resume=WandbResume.append)
    assert inits[-1]["resume"] == "allow" and inits[-1]["id"] == fork["id"]


def test_a_job_that_resumed_from_no_checkpoint_starts_a_new_wandb_run(tmp_path, inits):
    """A crash before the first checkpoint: the metrics start over at step 1, so must the W&B run."""
    _job(tmp_path, 0)
    old = inits[-1]["id"]
    _job(tmp_path, 0)
    assert inits[-1]["id"] != old and "resume_from" not in inits[-1]
