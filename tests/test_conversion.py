"""A reshape-resume whose universal conversion outlasts parallel.collective_timeout_s, and
fails part way, still finishes under torchrun --max-restarts: the ranks waiting for rank 0 poll
the rendezvous store instead of waiting in a collective, and the restarted attempt continues
the conversion from its journal (recipes.convert). The faults are injected into DeepSpeed's
converter functions by a sitecustomize in the test's PYTHONPATH (rank 0 and its conversion
child only), so the recipe carries no test hook."""
from __future__ import annotations

import pytest

from tests.train_launch import REPO, tail, train_fails, train_ok

FAULTS = '''
import os
if os.environ.get("RANK") == "0" and os.environ.get("CONVERSION_FAULT"):
    import time
    from deepspeed.checkpoint import ds_to_universal as _m
    _extract, _merge = _m.extract_zero_shards, _m.merge_tp_slices
    def _faulty_extract(*args):
        if os.environ["CONVERSION_FAULT"] == "disk full":
            raise OSError("disk full (injected)")
        time.sleep(float(os.environ.get("SLOW_EXTRACT_S", "0")))
        return _extract(*args)
    def _faulty_merge(*args):
        if os.environ["CONVERSION_FAULT"] == "lost on the first attempt" and \\
                os.environ.get("TORCHELASTIC_RESTART_COUNT") == "0":
            raise OSError("node lost (injected)")
        return _merge(*args)
    _m.extract_zero_shards, _m.merge_tp_slices = _faulty_extract, _faulty_merge
'''
RUN = ["trainer.max_steps=4", "trainer.save_every=2", "trainer.seed=3", "parallel.sp_size=2"]


def _faults(tmp_path, **env) -> dict:
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(FAULTS)
    return {"PYTHONPATH": f"{REPO}:{site}", **env}


@pytest.mark.slow
def test_a_long_conversion_that_fails_part_way_finishes_under_max_restarts(tmp_path):
    run = tmp_path / "run"
    train_ok(run, 2, RUN + ["deepspeed.zero_stage=2", "trainer.stop_at_step=2"])
    # ZeRO-2 -> ZeRO-1 at the same world: a new partitioning, converted to the universal format.
    # Attempt 0: the extraction takes 6 s per rank's file (the collective timeout is 4 s), then
    # the first merge fails; torchrun restarts both ranks; attempt 1 continues.
    env = _faults(tmp_path, CONVERSION_FAULT="lost on the first attempt", SLOW_EXTRACT_S="6")
    proc = train_ok(run, 2, RUN + ["deepspeed.zero_stage=1", "parallel.collective_timeout_s=4"], env=env,
                    torchrun_args=["--max-restarts=1"], timeout=300)
    out = proc.stdout + proc.stderr
    assert "node lost (injected)" in out and "waiting for rank 0 to convert" in out, tail(proc)
    assert "resuming a conversion: 2 of" in out, tail(proc)  # both extraction units were journaled
    assert "at step 2 (universal format: world 2 ZeRO-2 -> world 2 ZeRO-1)" in out, tail(proc)
    assert "recipes.convert: converted " in out, tail(proc)
    # the conversion was renamed into place (retention then removed it: the step-4 save and
    # step 2 fill keep_checkpoints=2, and a universal copy counts as one more)
    assert not list(run.glob("checkpoints/*/.tmp-universal")), tail(proc)


@pytest.mark.slow
def test_a_failed_conversion_ends_every_rank_with_its_reason(tmp_path):
    """Rank 0's conversion fails: the waiting ranks do not poll forever, they end naming it."""
    run = tmp_path / "run"
    train_ok(run, 2, RUN + ["deepspeed.zero_stage=2", "trainer.stop_at_step=2"])
    env = _faults(tmp_path, CONVERSION_FAULT="disk full")
    proc = train_fails(run, 2, RUN + ["deepspeed.zero_stage=1"], env=env, timeout=180)
    # the converter's traceback, rank 0's error and rank 1's report
    assert proc.stderr.count("disk full (injected)") >= 3, tail(proc)
    assert "the next attempt continues the conversion" in proc.stderr, tail(proc)
