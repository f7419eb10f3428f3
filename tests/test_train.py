"""The training recipe end to end through subprocesses: sequence/data parallelism, accumulation
and ZeRO stages reproduce the single-process run; resume, crash-safe checkpoints, W&B, bad input.

    pytest tests/test_train.py -m slow       # ~ a few minutes on 2 CPU cores
"""
from __future__ import annotations

from pathlib import Path

import pytest

from recipes.checkpoint import TEST_CRASH_ENV
from tests.train_launch import (assert_losses_close, assert_weights_close, final_weights, metrics, tail,
                                train_fails, train_ok)

STEPS = 6
RUN = [f"trainer.max_steps={STEPS}", "trainer.save_every=3", "trainer.seed=3"]


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    """sp=1, one process, no accumulation: the reference every other shape must match."""
    d = tmp_path_factory.mktemp("baseline")
    train_ok(d, 1, RUN)
    m = metrics(d)
    assert sorted(m) == list(range(1, STEPS + 1))
    assert m[STEPS]["loss"] < m[1]["loss"], "the baseline should learn something in 6 steps"
    # the first logged row says, once, which kernel ran each block kind (CPU: auto is sdpa)
    assert m[1]["attention_kernel"] == "attention kernel: sdpa (cpu)", m[1]
    assert m[1]["kernels_by_block"] and all(v == ["sdpa"] for v in m[1]["kernels_by_block"].values()), m[1]
    assert not any("kernels_by_block" in m[s] for s in range(2, STEPS + 1))
    return d


EQUIVALENT = {
    "sp2": (2, ["parallel.sp_size=2"]),
    # four ranks: dp2xsp2 and sp4_hybrid_u2 (the ring alone at P = 4: tests/test_ring_attention.py)
    "dp2xsp2": (4, ["parallel.sp_size=2"]),
    "sp2_contiguous_accum4": (2, ["parallel.sp_size=2", "parallel.layout=contiguous", "data.micro_batch_size=2"]),
    "dp2_striped_accum2": (2, ["parallel.sp_size=1", "parallel.layout=striped", "data.micro_batch_size=2"]),
    "accum8": (1, ["data.micro_batch_size=1"]),
    "sp2_ulysses": (2, ["parallel.sp_size=2", "parallel.ulysses_size=2"]),
    "sp4_hybrid_u2": (4, ["parallel.sp_size=4", "parallel.ulysses_size=2"]),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(EQUIVALENT))
def test_equivalence(baseline, tmp_path, name):
    nproc, over = EQUIVALENT[name]
    train_ok(tmp_path, nproc, RUN + over)
    ref, got = metrics(baseline), metrics(tmp_path)
    assert sorted(got) == sorted(ref)
    assert_losses_close(ref, got, range(1, STEPS + 1))
    for key in ("lr", "grad_norm"):
        assert got[STEPS][key] == pytest.approx(ref[STEPS][key], rel=1e-4), key
    assert_weights_close(final_weights(baseline), final_weights(tmp_path))


@pytest.mark.slow
def test_packed_text_documents_equivalence(tmp_path):
    """Local text through the tokenise-once cache, packed with document masking: sp=2
    (doc_zigzag) matches sp=1; a doc_zigzag run stopped at step 2 and resumed ends equal
    (zigzag with packed documents: test_equivalence)."""
    text = tmp_path / "corpus.jsonl"
    text.write_text("".join('{"text": "%s"}\n' % ("document %d " % i + "words " * (i % 7)) for i in range(60)))
    over = ["data=text", f"data.files=[{text}]", "data.seq_len=32", "data.global_batch_size=4",
            "trainer.max_steps=4", "trainer.save_every=2", f"data.cache_dir={tmp_path / 'cache'}"]
    sp2 = ["parallel.sp_size=2"]
    train_ok(tmp_path / "sp1", 1, over)
    ref = metrics(tmp_path / "sp1")
    assert sorted(ref) == [1, 2, 3, 4]
    for name, extra in (("sp2_doc_zigzag", ["parallel.layout=doc_zigzag"]),):
        train_ok(tmp_path / name, 2, over + sp2 + extra)
        got = metrics(tmp_path / name)
        assert sorted(got) == [1, 2, 3, 4], name
        assert_losses_close(ref, got, [1, 2, 3, 4])
        assert_weights_close(final_weights(tmp_path / "sp1"), final_weights(tmp_path / name))
    resumed = over + sp2 + ["parallel.layout=doc_zigzag"]
    train_ok(tmp_path / "resume", 2, resumed + ["trainer.stop_at_step=2"])
    proc = train_ok(tmp_path / "resume", 2, resumed)  # the same command again
    assert "resumed from" in proc.stdout + proc.stderr
    assert_losses_close(ref, metrics(tmp_path / "resume"), [3, 4])
    assert_weights_close(final_weights(tmp_path / "sp1"), final_weights(tmp_path / "resume"))


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])  # ZeRO-1 (optimizer states only) is inside ZeRO-2
def test_zero_stages_train(baseline, tmp_path, stage):
    over = ["parallel.sp_size=2", f"deepspeed.zero_stage={stage}", "trainer.save_every=0"]
    train_ok(tmp_path, 2, RUN + over)
    # fp32 ZeRO is the same math: the losses must match the stage-0 single-process run
    assert_losses_close(metrics(baseline), metrics(tmp_path), range(1, STEPS + 1))


@pytest.mark.slow
def test_bf16_zero3_activation_checkpointing_trains(baseline, tmp_path):
    over = ["parallel.sp_size=2", "deepspeed.zero_stage=3", "trainer.dtype=bf16",
            "model.activation_checkpointing=true", "trainer.save_every=0"]
    train_ok(tmp_path, 2, RUN + over)
    ref, got = metrics(baseline), metrics(tmp_path)
    assert_losses_close(ref, got, range(1, STEPS + 1), rel=3e-2)  # bf16: close to fp32, not equal
    assert got[STEPS]["loss"] < got[1]["loss"]


@pytest.mark.slow
def test_resume_matches_straight_run(baseline, tmp_path):
    train_ok(tmp_path, 2, RUN + ["parallel.sp_size=2", "trainer.stop_at_step=3"])
    assert sorted(metrics(tmp_path)) == [1, 2, 3]
    assert (tmp_path / "checkpoints" / "step_00000003" / "meta.json").exists()
    proc = train_ok(tmp_path, 2, RUN + ["parallel.sp_size=2"])  # the same command again
    assert "resumed from" in proc.stdout + proc.stderr
    got = metrics(tmp_path)
    assert sorted(got) == list(range(1, STEPS + 1))
    assert_losses_close(metrics(baseline), got, range(4, STEPS + 1))
    assert_weights_close(final_weights(baseline), final_weights(tmp_path))


@pytest.mark.slow
def test_crash_during_save_leaves_previous_checkpoint(baseline, tmp_path):
    proc = train_fails(tmp_path, 2, RUN + ["parallel.sp_size=2"], env={TEST_CRASH_ENV: str(STEPS)})
    ck = tmp_path / "checkpoints"
    assert sorted(p.name for p in ck.iterdir()) == [f".tmp-step_{STEPS:08d}", "step_00000003"], tail(proc)
    train_ok(tmp_path, 2, RUN + ["parallel.sp_size=2"])  # rerun: resumes from step 3
    got = metrics(tmp_path)
    assert sorted(got) == list(range(1, STEPS + 1))
    assert_losses_close(metrics(baseline), got, range(1, STEPS + 1))
    assert sorted(p.name for p in ck.iterdir()) == ["step_00000003", f"step_{STEPS:08d}"]


@pytest.mark.slow
def test_wandb_offline_run_in_run_dir_and_resumed(tmp_path):
    over = ["trainer.max_steps=4", "trainer.save_every=2", "logger=wandb"]
    train_ok(tmp_path, 1, over + ["trainer.stop_at_step=2"])
    run_id = (tmp_path / "wandb_run_id").read_text().strip()
    train_ok(tmp_path, 1, over)  # resumed: the same W&B run id continues
    assert (tmp_path / "wandb_run_id").read_text().strip() == run_id
    runs = sorted((tmp_path / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(runs) == 2, list((tmp_path / "wandb").iterdir())
    records = b"".join((r / f"run-{run_id}.wandb").read_bytes() for r in runs)
    for needle in (b"tokens_per_s", b"grad_norm", b"loss", b"seq_len", b"global_batch_size", b"zero_stage"):
        assert needle in records, f"{needle!r} missing from the offline W&B run"
    assert (tmp_path / "config.yaml").exists() and sorted(metrics(tmp_path)) == [1, 2, 3, 4]


# ---- bad input: a clear error before any work ----

def _no_work_done(run_dir: Path):
    assert not (run_dir / "metrics.jsonl").exists() and not (run_dir / "checkpoints").exists()


@pytest.mark.slow
@pytest.mark.parametrize("nproc, over, message", [
    (1, ["trainer.no_such_key=1"], "no_such_key"),
    (1, ["model=no_such_model"], "no_such_model"),
    (1, ["parallel.sp_size=2"], "does not divide the world size 1"),
    (1, ["parallel.ulysses_size=2"], "parallel.ulysses_size=2 does not divide parallel.sp_size=1"),
    (2, ["parallel.sp_size=2", "parallel.ulysses_size=2", "model.n_heads=1", "model.n_kv_heads=1"],
     "parallel.ulysses_size=2: Ulysses over 2 ranks needs at least 2 query heads"),
    (1, ["data=text", "data.seq_len=32", "data.files=[/no/such/file.txt]"], "data file not found: /no/such/file.txt"),
    (2, ["parallel.sp_size=2", "data.seq_len=30"], "must be a multiple of 4"),
    (1, ["trainer.dtype=fp16"], "Invalid value 'fp16', expected one of [fp32, bf16]\n    full_key: trainer.dtype"),
    (1, ["parallel.backend=torch_varlen"], "backend 'torch_varlen' cannot run this input: torch's varlen attention runs on CUDA only"),
    (1, ["trainer.max_steps=0"], "trainer.max_steps=0: must be >= 1"),
    (1, ["deepspeed.offload_param=true"], "deepspeed.offload_param needs deepspeed.zero_stage=3"),
    (1, ["parallel.layout=doc_zigzag"], "places tokens by document: it needs packed documents"),
])
def test_bad_input_errors(tmp_path, nproc, over, message):
    proc = train_fails(tmp_path, nproc, ["trainer.max_steps=2"] + over)
    assert message in proc.stderr + proc.stdout, tail(proc)
    _no_work_done(tmp_path)


@pytest.mark.slow
def test_corrupt_or_incompatible_checkpoint_is_reported_and_kept(tmp_path):
    train_ok(tmp_path, 1, ["trainer.max_steps=2", "trainer.save_every=2"])
    states = tmp_path / "checkpoints" / "step_00000002" / "mp_rank_00_model_states.pt"
    before_metrics = (tmp_path / "metrics.jsonl").read_text()

    proc = train_fails(tmp_path, 1, ["trainer.max_steps=4", "trainer.save_every=2", "model.dim=32"])
    assert "incompatible" in proc.stderr and "model" in proc.stderr, tail(proc)

    states.write_bytes(b"not a checkpoint" + states.read_bytes()[16:])
    corrupt = states.read_bytes()
    proc = train_fails(tmp_path, 1, ["trainer.max_steps=4", "trainer.save_every=2"])
    assert "is corrupt" in proc.stderr, tail(proc)
    assert states.read_bytes() == corrupt, "the corrupt checkpoint was modified"
    assert (tmp_path / "metrics.jsonl").read_text() == before_metrics
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_00000002"]
