"""Preemptible clusters, end to end with the real launchers on CPU: a signal sent to the torchrun
agent makes the ranks save and exit; a checkpoint of world 2 (sp=2, ZeRO-2) resumes at world 1
and at world 4 (dp=2 x sp=2); a truncated latest checkpoint falls back to the previous one.

    pytest tests/test_preemption.py -m slow       # ~ 2.5 minutes on 2 CPU cores
"""
from __future__ import annotations

import json
import os
import shutil
import signal

import pytest

from tests.test_launch import LAUNCH, finish, start, wait_for
from tests.train_launch import FAST, metrics, tail, train_ok

STEPS, SAVE_EVERY = 24, 8
# sp=2, ZeRO-2 (optimizer state partitioned over the 2 ranks), fp32; 24 short steps so that a
# signal sent after the first logged step lands mid-run
RUN = FAST + ["data.seq_len=64", f"trainer.max_steps={STEPS}", "trainer.seed=3"]
SP2 = RUN + ["parallel.sp_size=2", "deepspeed.zero_stage=2"]


def _assert_losses_equal(ref: dict, got: dict, steps, rel: float):
    for s in steps:
        a, b = ref[s]["loss"], got[s]["loss"]
        assert abs(a - b) <= rel * abs(a), f"step {s}: loss {a!r} vs {b!r} (rel {abs(a - b) / abs(a):.2e} > {rel})"


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The uninterrupted world-2 run: checkpoints every 8 steps, the newest 2 kept (16, 24)."""
    d = tmp_path_factory.mktemp("straight")
    train_ok(d, 2, SP2 + [f"trainer.save_every={SAVE_EVERY}"])
    assert sorted(metrics(d)) == list(range(1, STEPS + 1))
    assert sorted(p.name for p in (d / "checkpoints").glob("step_*")) == ["step_00000016", "step_00000024"], \
        "trainer.keep_checkpoints=2 keeps the newest two"
    return d


@pytest.mark.slow
def test_sigterm_to_torchrun_agent_saves_the_step_in_flight_and_the_rerun_matches(straight, tmp_path):
    """SIGTERM to the torchrun agent (launch/torchrun_single_node.sh execs it): the agent forwards
    it to both ranks, which finish their step, agree, save a checkpoint at that step (no periodic
    saves here) and exit 0 (torchrun's ranks; stopped.json holds 143); rerunning the same command ends with the uninterrupted run's losses.
    Same shape, same arithmetic: equal to 1e-6 relative (fp32; in practice bit-identical)."""
    cmd = [LAUNCH / "torchrun_single_node.sh", *SP2, "trainer.save_every=0", f"hydra.run.dir={tmp_path / 'run'}"]
    env = {"NPROC_PER_NODE": "2", "SHUTDOWN_TIMEOUT": "60"}
    agent = start(cmd, tmp_path, env)
    logged = tmp_path / "run" / "metrics.jsonl"
    wait_for(lambda: logged.exists() and len(logged.read_text().splitlines()) >= 2, agent, 180, "two logged steps")
    os.kill(agent.pid, signal.SIGTERM)
    rc, out = finish(agent, 120)
    assert rc != 0, out[-3000:]  # torchrun itself was told to stop: it exits 1
    assert "SIGTERM received: saving a checkpoint at step" in out, out[-3000:]
    assert "forcefully exiting" not in out, "torchrun killed a rank before it finished saving"
    ckpts = sorted((tmp_path / "run" / "checkpoints").glob("step_*"))
    assert len(ckpts) == 1, ckpts
    saved_at = json.loads((ckpts[0] / "meta.json").read_text())["step"]
    logged_steps = sorted(metrics(tmp_path / "run"))
    assert 2 <= saved_at < STEPS and logged_steps[-1] == saved_at, (saved_at, logged_steps)
    assert (ckpts[0] / "manifest.json").exists()
    marker = json.loads((tmp_path / "run" / "stopped.json").read_text())
    assert (marker["stopped_by"], marker["step"], marker["finished"]) == ("SIGTERM", saved_at, False), marker
    assert f"hydra.run.dir={tmp_path / 'run'} to resume" in out, out[-3000:]
    # the ranks exit cleanly; the only traceback is torchrun's own (it re-raises the signal)
    assert out.count("Traceback") == out.count("SignalException: Process") <= 1, out[-3000:]

    rc, out = finish(start(cmd, tmp_path, env), 180)  # the same command again
    assert rc == 0, out[-3000:]
    assert f"resumed from {ckpts[0]} at step {saved_at}" in out, out[-3000:]
    got = metrics(tmp_path / "run")
    assert sorted(got) == list(range(1, STEPS + 1))
    _assert_losses_equal(metrics(straight), got, range(1, STEPS + 1), rel=1e-6)
    assert not (tmp_path / "run" / "stopped.json").exists(), "a finished run is not marked stopped"


# Resumed at another shape, a run does the same math with another summation order: fp32 rounding
# differences of ~1e-7 relative per step, compounding over the 8 steps after the resume.
RESHAPE_REL = 1e-5


def _copy_checkpoints(src, dst, steps):
    for s in steps:
        shutil.copytree(src / "checkpoints" / f"step_{s:08d}", dst / "checkpoints" / f"step_{s:08d}")


@pytest.mark.slow
def test_truncated_latest_falls_back_and_world_2_zero_2_resumes_at_world_1_zero_1(straight, tmp_path):
    """Checkpoints 16 and 24 of the world-2 ZeRO-2 run; 24's optimizer shard of rank 1 is cut in half.
    One process at ZeRO-1 resumes: it warns that step 24 is corrupt, falls back to 16 (converted to
    the universal format: another world and ZeRO stage) and trains 17..24.

    The comparison: the losses of steps 17..24 against the uninterrupted world-2 run, i.e. the run
    that wrote the checkpoint, continuing from exactly the checkpoint's weights, Adam moments,
    schedule and data position with no save or load in between. Any world size and ZeRO stage
    computes the same fp32 math up to summation order (tests/test_train.py::test_equivalence), so
    a faithful resume matches to rounding (RESHAPE_REL; measured <= 2e-7), while the losses move
    by 1e-2..1e-1 relative per step: a lost moment, schedule step or data position cannot hide."""
    _copy_checkpoints(straight, tmp_path, (16, 24))
    shard = tmp_path / "checkpoints" / "step_00000024" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    proc = train_ok(tmp_path, 1, RUN + ["deepspeed.zero_stage=1"])
    out = proc.stdout + proc.stderr
    assert "checkpoint" in out and "step_00000024 is incomplete or corrupt" in out and \
        "zero_pp_rank_1_mp_rank_00_optim_states.pt has" in out and "falling back" in out, tail(proc)
    assert "at step 16 (universal format: world 2 ZeRO-2 -> world 1 ZeRO-1)" in out, tail(proc)
    got = metrics(tmp_path)
    assert sorted(got) == list(range(17, STEPS + 1)), "only the resumed steps were logged in this dir"
    _assert_losses_equal(metrics(straight), got, range(17, STEPS + 1), rel=RESHAPE_REL)


@pytest.mark.slow
def test_world_2_checkpoint_resumes_at_world_4_dp2_sp2(straight, tmp_path):
    """Step 16 of the world-2 (dp=1 x sp=2) ZeRO-2 run resumed by 4 processes, dp=2 x sp=2, ZeRO-2:
    the optimizer state is re-partitioned over 4 ranks, each dp rank takes half of every global
    batch of the same samples. Compared as in the world-1 test (docstring there): steps 17..24
    against the uninterrupted run that wrote the checkpoint."""
    _copy_checkpoints(straight, tmp_path, (16,))
    proc = train_ok(tmp_path, 4, SP2)
    assert "world 4 = dp 2 x sp 2" in proc.stdout + proc.stderr, tail(proc)
    assert "at step 16 (universal format: world 2 ZeRO-2 -> world 4 ZeRO-2)" in proc.stdout + proc.stderr, tail(proc)
    got = metrics(tmp_path)
    assert sorted(got) == list(range(17, STEPS + 1))
    _assert_losses_equal(metrics(straight), got, range(17, STEPS + 1), rel=RESHAPE_REL)
