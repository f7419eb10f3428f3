"""A reshape-resume whose universal conversion outlasts parallel.collective_timeout_s still
finishes: the ranks waiting for rank 0 poll the rendezvous store instead of waiting in a
collective. The conversion is slowed by a sitecustomize in the test's PYTHONPATH (rank 0 only),
so the recipe carries no test hook."""
from __future__ import annotations

import pytest

from tests.train_launch import REPO, tail, train_fails, train_ok

SLOW = '''
import os
if os.environ.get("RANK") == "0" and os.environ.get("SLOW_CONVERSION_S"):
    import time
    from deepspeed.checkpoint import ds_to_universal as _m
    _convert = _m.main
    def _slow(args):
        time.sleep(float(os.environ["SLOW_CONVERSION_S"]))
        return _convert(args)
    _m.main = _slow
'''
RUN = ["trainer.max_steps=4", "trainer.save_every=2", "trainer.seed=3", "parallel.sp_size=2"]


@pytest.mark.slow
def test_a_conversion_longer_than_the_collective_timeout_finishes(tmp_path):
    run = tmp_path / "run"
    train_ok(run, 2, RUN + ["deepspeed.zero_stage=2", "trainer.stop_at_step=2"])
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SLOW)
    env = {"PYTHONPATH": f"{REPO}:{site}", "SLOW_CONVERSION_S": "12"}
    # ZeRO-2 -> ZeRO-1 at the same world: a new partitioning, converted to the universal format
    proc = train_ok(run, 2, RUN + ["deepspeed.zero_stage=1", "parallel.collective_timeout_s=4"], env=env)
    out = proc.stdout + proc.stderr
    assert "at step 2 (universal format: world 2 ZeRO-2 -> world 2 ZeRO-1)" in out, tail(proc)
    assert "waiting for rank 0 to convert" in out, tail(proc)


@pytest.mark.slow
def test_a_failed_conversion_ends_every_rank_with_its_reason(tmp_path):
    """Rank 0's conversion fails: the waiting ranks do not poll forever, they end naming it."""
    run = tmp_path / "run"
    train_ok(run, 2, RUN + ["deepspeed.zero_stage=2", "trainer.stop_at_step=2"])
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SLOW.replace("time.sleep(float(os.environ[\"SLOW_CONVERSION_S\"]))",
                                                        "raise OSError('disk full (injected)')"))
    env = {"PYTHONPATH": f"{REPO}:{site}", "SLOW_CONVERSION_S": "1"}
    proc = train_fails(run, 2, RUN + ["deepspeed.zero_stage=1"], env=env, timeout=180)
    assert proc.stderr.count("disk full (injected)") >= 2, tail(proc)  # rank 0's error and rank 1's report
