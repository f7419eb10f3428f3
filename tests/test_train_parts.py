"""Fast unit tests of the recipe's parts: model, data, schedule, batch sizes, signals, throughput clock."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from recipes import data, engine, models
from recipes.train import JobConfig, batch_sizes
from ringattn.models import Llama, LlamaConfig
from ringattn.models.llama import apply_rope, rope_cos_sin

import ringattn


def _model(**kw):
    torch.manual_seed(0)
    return Llama(LlamaConfig(**{"dim": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 50, **kw}))


def test_rope_is_relative_and_uses_given_positions():
    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)
    dots = []
    for shift in (0, 37):
        cos, sin = rope_cos_sin(torch.tensor([5 + shift]), 8, 10000.0, torch.float32)
        cos2, sin2 = rope_cos_sin(torch.tensor([2 + shift]), 8, 10000.0, torch.float32)
        dots.append((apply_rope(q, cos, sin) * apply_rope(k, cos2, sin2)).sum())
    torch.testing.assert_close(dots[0], dots[1])
    a = rope_cos_sin(torch.tensor([3]), 8, 10000.0, torch.float32)[0]
    b = rope_cos_sin(torch.tensor([3]), 8, 500000.0, torch.float32)[0]
    assert not torch.allclose(a, b), "rope_theta must matter"


def test_model_causal_gqa_and_positions():
    m = _model()
    x = torch.randint(0, 50, (2, 12))
    full = m(x, torch.arange(12))
    assert full.shape == (2, 12, 50)
    part = m(x[:, :7], torch.arange(7))  # causal: the prefix does not see the future
    torch.testing.assert_close(full[:, :7], part, rtol=1e-5, atol=1e-5)
    shifted = m(x[:, :7], torch.arange(7) + 100)  # rope is relative: same logits at other positions
    torch.testing.assert_close(part, shifted, rtol=1e-4, atol=1e-4)


def test_tied_embeddings_and_activation_checkpointing():
    tied = _model(tie_embeddings=True)
    assert tied.output is None
    assert sum(p.numel() for p in tied.parameters()) == tied.cfg.num_params()
    assert sum(p.numel() for p in _model().parameters()) == _model().cfg.num_params()
    x = torch.randint(0, 50, (2, 12))
    grads = []
    for ckpt in (False, True):
        m = _model(activation_checkpointing=ckpt)
        m(x, torch.arange(12)).logsumexp(-1).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in m.parameters()]))
    torch.testing.assert_close(grads[0], grads[1])


def test_document_masking_matches_separate_documents():
    m = _model()
    x = torch.randint(0, 50, (1, 12))
    cu = torch.tensor([0, 5, 12], dtype=torch.int32)
    pos = torch.tensor([0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 6])
    packed = m(x, pos, cu)
    torch.testing.assert_close(packed[:, :5], m(x[:, :5], torch.arange(5)), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed[:, 5:], m(x[:, 5:], torch.arange(7)), rtol=1e-5, atol=1e-5)


def test_packed_text_documents(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("hello world\nab\nanother line of text here\n" * 4)
    cfg = data.DataConfig(kind="text", seq_len=16, files=[str(f)], cache_dir=str(tmp_path / "cache"))
    ds = data.PackedText(cfg, seed=0, tokenizer=data.ByteTokenizer())
    tokens, labels, cu = ds.sample(0)
    eos = (tokens == data.ByteTokenizer.EOS).nonzero().flatten()
    assert cu[0] == 0 and cu[-1] == 16 and cu.dtype == torch.int32
    assert sorted(set((eos + 1).tolist()) - {16}) == cu[1:-1].tolist()
    assert (labels[eos] == data.IGNORE_INDEX).all()
    with pytest.raises(FileNotFoundError, match="data file not found"):
        data.check_files(data.DataConfig(kind="text", files=[str(tmp_path / "missing.txt")]))


def test_passkey_is_deterministic_shifted_and_crosses_shards():
    cfg = data.DataConfig(seq_len=64, passkey_digits=2, needle_min_frac=0.25, needle_max_frac=0.5)
    task = data.PasskeyTask(cfg, seed=1)
    t1, l1 = task.sample(7)
    t2, l2 = task.sample(7)
    assert torch.equal(t1, t2) and torch.equal(l1, l2)
    assert not torch.equal(t1, task.sample(8)[0])
    ans = (l1 != data.IGNORE_INDEX).nonzero().flatten()
    assert ans.tolist() == [62, 63]  # the query marker and the first digit predict the next digit
    assert t1[62] == data.PasskeyTask.QUERY and l1[62] == t1[63]  # labels shifted on the full sequence
    needle = (t1 == data.PasskeyTask.KEY).nonzero().item()
    digits = t1[needle + 1:needle + 3]
    assert torch.equal(l1[62:64], digits)
    # for P=2 the needle and the query sit on different ranks under zigzag and contiguous
    for layout, owner in (("zigzag", lambda i: 0 if i < 16 or i >= 48 else 1), ("contiguous", lambda i: i // 32)):
        assert owner(needle) != owner(62), layout


def test_passkey_depth_range_default_covers_the_context_and_is_checked():
    task = data.PasskeyTask(data.DataConfig(seq_len=32, passkey_digits=2), seed=0)
    at = {int((task.sample(i)[0] == data.PasskeyTask.KEY).nonzero()[0]) for i in range(400)}
    assert min(at) == 0 and max(at) == 32 - 2 * 2 - 1  # first token .. needle just before the query
    narrow = data.PasskeyTask(data.DataConfig(seq_len=33, needle_min_frac=0.5, needle_max_frac=0.5), seed=0)
    assert {int((narrow.sample(i)[0] == data.PasskeyTask.KEY).nonzero()[0]) for i in range(20)} == {15}
    with pytest.raises(ValueError, match="need 0 <= min <= max <= 1"):
        data.PasskeyTask(data.DataConfig(needle_min_frac=0.6, needle_max_frac=0.5), seed=0)


def test_step_batches_are_the_same_whatever_dp_and_accumulation():
    task = data.PasskeyTask(data.DataConfig(seq_len=32, passkey_digits=1), seed=0)

    def step_samples(dp, micro):
        rows = []
        for r in range(dp):
            for x, _, _ in data.StepBatches(task, 8, r, dp, micro).micro_batches(3):
                rows.append(x)
        return torch.cat(rows)

    ref = step_samples(1, 8)
    for dp, micro in ((2, 4), (2, 1), (4, 2), (1, 2)):
        assert torch.equal(step_samples(dp, micro), ref)


def test_lr_schedule_warmup_then_cosine():
    f = engine.lr_lambda(engine.OptimConfig(warmup_steps=10, min_lr_ratio=0.1), max_steps=110)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.55) and f(110) == pytest.approx(0.1)


def test_batch_sizes_derive_micro_batch_and_accumulation():
    job = JobConfig()
    job.data = dataclasses.replace(job.data, global_batch_size=16, micro_batch_size=2, eval_batch_size=16)
    job.parallel = dataclasses.replace(job.parallel, sp_size=2)
    model = models.resolve(job.model, data.ByteTokenizer())
    b = batch_sizes(job, 8, model)
    assert (b.dp, b.micro, b.grad_accum) == (4, 2, 2)
    ds = engine.deepspeed_config(job.deepspeed, job.optim, "fp32", b.micro, b.grad_accum, 8)
    assert ds["train_batch_size"] == 2 * 2 * 8 and ds["optimizer"]["params"]["lr"] == job.optim.lr
    assert not ds["bf16"]["enabled"]
    from recipes.choices import Dtype

    assert engine.deepspeed_config(job.deepspeed, job.optim, Dtype.bf16, b.micro, b.grad_accum, 8)["bf16"]["enabled"]
    job.data = dataclasses.replace(job.data, seq_len=ringattn.layout_divisor("zigzag", 2) * 10 + 2)
    with pytest.raises(ValueError, match="multiple of 4"):
        batch_sizes(job, 8, model)


@pytest.mark.parametrize("tie", [False, True])
def test_model_object_answers_heads_shape_flops_and_builds(tie):
    """recipes.models.resolve: the vocabulary comes from the tokenizer; the shape's counts are
    the built module's; FLOPs per step = 6 N (output head included) + causal attention."""
    cfg = LlamaConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, tie_embeddings=tie)
    model = models.resolve(cfg, data.ByteTokenizer())
    assert model.heads == (4, 2) and model.cfg.vocab_size == data.ByteTokenizer.vocab_size
    module = model.build(None, torch.device("cpu"), {})
    shape = model.shape
    assert shape.params == sum(p.numel() for p in module.parameters())
    emb = module.tok_embeddings.weight.numel() * (1 if tie else 2)
    assert shape.num_params(include_embedding=False) == shape.params - emb
    assert (shape.kv_dim, shape.ffn_dim) == (2 * 8, cfg.ffn_dim)
    n = shape.params - emb + shape.vocab_size * 32
    # backward = 2x forward (PaLM / torchtitan): 6 N per token + 3 x causal attention forward
    assert shape.flops_per_step(3, 16) == 6 * n * 3 * 16 + 3 * 2 * 3 * 16**2 * 32 * 2
    with pytest.raises(ValueError, match="model.vocab_size=10 < tokenizer vocabulary 259"):
        models.resolve(dataclasses.replace(cfg, vocab_size=10), data.ByteTokenizer())


def test_typed_choices_and_ranges_fail_naming_the_field():
    """Enum fields are checked when the config is composed, ranges when it becomes objects."""
    from omegaconf import OmegaConf, ValidationError

    from recipes.choices import Dtype
    from recipes.distributed import Layout

    cfg = OmegaConf.structured(JobConfig)
    cfg.trainer.dtype = "bf16"
    cfg.parallel.layout = "striped"
    assert cfg.trainer.dtype is Dtype.bf16 and cfg.parallel.layout is Layout.striped
    assert set(Layout.__members__) == set(ringattn.layouts.LAYOUTS)  # the library's registry
    for key, bad, allowed in (("trainer.dtype", "fp16", "[fp32, bf16]"), ("data.kind", "books", "[passkey, text, shared_prompt]"),
                              ("logger.backend", "tensorboard", "[none, wandb]"), ("parallel.layout", "ring", "zigzag"),
                              ("parallel.backend", "flash3", "[auto, fa3, flash_attn, torch_varlen, sdpa, math]")):
        with pytest.raises(ValidationError, match=rf"(?s)Invalid value '{bad}', expected one of .*{key}") as e:
            OmegaConf.update(cfg, key, bad)
        assert allowed in str(e.value)
    job = JobConfig()
    for build, message in (
        (lambda: dataclasses.replace(job.trainer, max_steps=0), "trainer.max_steps=0: must be >= 1"),
        (lambda: dataclasses.replace(job.trainer, save_every=-1), "trainer.save_every=-1: must be >= 0"),
        (lambda: dataclasses.replace(job.data, micro_batch_size=0), "data.micro_batch_size=0: must be >= 1"),
        (lambda: dataclasses.replace(job.data, needle_min_frac=0.6, needle_max_frac=0.5), "need 0 <= min <= max <= 1"),
        (lambda: dataclasses.replace(job.deepspeed, zero_stage=4), "deepspeed.zero_stage=4: expected 0, 1, 2 or 3"),
        (lambda: dataclasses.replace(job.deepspeed, offload_optimizer=True), "offload_optimizer needs"),
        (lambda: dataclasses.replace(job.parallel, sp_size=4, ulysses_size=3), "ulysses_size=3 does not divide"),
        (lambda: dataclasses.replace(job.parallel, collective_timeout_s=0), "collective_timeout_s=0: must be > 0"),
    ):
        with pytest.raises(ValueError, match=message):
            build()
    # the composed config goes through __post_init__ too
    cfg = OmegaConf.structured(JobConfig)
    cfg.model = OmegaConf.structured(LlamaConfig)
    cfg.trainer.max_steps = 0
    with pytest.raises(ValueError, match="trainer.max_steps=0"):
        OmegaConf.to_object(cfg)


def test_parallel_strategy_named_or_derived():
    """``parallel.strategy`` names the library's strategy; left null it follows from ulysses_size."""
    from recipes.distributed import ParallelConfig

    assert ParallelConfig(sp_size=4).resolved_strategy == "ring"
    assert ParallelConfig(sp_size=4, ulysses_size=4).resolved_strategy == "ulysses"
    assert ParallelConfig(sp_size=4, ulysses_size=2).resolved_strategy == "hybrid"
    named = ParallelConfig(sp_size=4, strategy="ulysses")  # ulysses_size left at 1: all of sp
    assert named.resolved_strategy == "ulysses" and named.ulysses_size == 4
    assert ParallelConfig(sp_size=4, strategy="hybrid", ulysses_size=2).ulysses_size == 2
    assert ParallelConfig(sp_size=4, strategy="allgather").resolved_strategy == "allgather"
    # Hydra builds the defaults first (an instance), then merges overrides: nothing the first
    # instance derived may contradict them.
    from omegaconf import OmegaConf
    merged = OmegaConf.merge(OmegaConf.structured(ParallelConfig()), {"sp_size": 2, "ulysses_size": 2})
    assert OmegaConf.to_object(merged).resolved_strategy == "ulysses"
    for kw, message in (({"strategy": "ring", "ulysses_size": 2}, "strategy=ring does not match"),
                        ({"strategy": "hybrid"}, "strategy=hybrid does not match"),
                        ({"strategy": "allgather", "ulysses_size": 2}, "needs parallel.ulysses_size=1")):
        with pytest.raises(ValueError, match=message):
            ParallelConfig(sp_size=4, **kw)


def test_logger_none_and_wandb_compose():
    """``logger=none`` (metrics.jsonl only, the default) and ``logger=wandb`` are config presets."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from recipes.tracking import Backend
    from tests.train_launch import REPO

    with initialize_config_dir(str(REPO / "conf"), version_base=None):
        for choice, backend in (("none", Backend.none), ("wandb", Backend.wandb)):
            job = OmegaConf.to_object(compose("train", overrides=[f"logger={choice}"]))
            assert job.logger.backend is backend, choice
        assert OmegaConf.to_object(compose("train")).logger.backend is Backend.none


# ---- preemption parts: the throughput clock, signals, checkpoint integrity (no processes) ----

def test_interval_clock_excludes_eval_and_checkpoint_time():
    from recipes.train import IntervalClock

    now = [100.0]
    clock = IntervalClock(lambda: now[0])
    for _ in range(4):  # 4 steps of 0.5 s, with an 8 s evaluation and a 3 s save in between
        now[0] += 0.5
        clock.step_done()
        if clock.steps == 2:
            with clock.excluded():
                now[0] += 8.0
            with clock.excluded():
                now[0] += 3.0
    assert clock.lap() == pytest.approx(0.5)  # not (2 + 11) / 4
    now[0] += 1.0
    clock.step_done()
    assert clock.lap() == pytest.approx(1.0), "a lap starts a new interval with nothing excluded"


def test_stop_signals_record_the_first_signal_and_agree_through_sums():
    import os
    import signal

    from recipes.train import StopSignals, exit_status

    before = signal.getsignal(signal.SIGUSR1)
    with StopSignals(["SIGTERM", "SIGUSR1"]) as stop:
        assert stop.flags() == [0.0, 0.0] and stop.agreed([0.0, 0.0]) is None
        os.kill(os.getpid(), signal.SIGUSR1)  # handled in this thread before kill() returns
        os.kill(os.getpid(), signal.SIGTERM)  # a second signal does not replace the first
        assert stop.received == signal.SIGUSR1 and stop.flags() == [0.0, 1.0]
        # summed over ranks: one rank had SIGUSR1, two had SIGTERM -> the first configured one
        assert stop.agreed([2.0, 1.0]) == signal.SIGTERM and stop.agreed([0.0, 1.0]) == signal.SIGUSR1
    assert signal.getsignal(signal.SIGUSR1) == before, "the previous handlers come back"
    assert (exit_status(signal.SIGTERM), exit_status(signal.SIGUSR1)) == (143, 138)
    # a rank of a launcher that acts on its ranks' status ends well; stopped.json says stopped
    assert (exit_status(signal.SIGTERM, watched=True), exit_status(signal.SIGUSR1, watched=True)) == (0, 0)
    assert StopSignals([]).flags() == []


def test_a_launcher_watches_its_ranks_under_torchrun_or_with_several_ranks(monkeypatch):
    from recipes.train import launcher_watches_ranks

    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    assert not launcher_watches_ranks(1) and launcher_watches_ranks(2)
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job")  # torchrun restarts even one failed rank
    assert launcher_watches_ranks(1)


def test_save_on_signal_names_are_checked():
    from recipes.train import TrainerConfig

    assert TrainerConfig(save_on_signal=[]).save_on_signal == []
    with pytest.raises(ValueError, match="trainer.save_on_signal: 'SIGKILL' is not a signal this process can catch"):
        TrainerConfig(save_on_signal=["SIGKILL"])
    with pytest.raises(ValueError, match="trainer.keep_checkpoints=-1: must be >= 0"):
        TrainerConfig(keep_checkpoints=-1)


def test_checkpoint_problems_name_truncated_altered_and_missing_files(tmp_path):
    from recipes import checkpoint

    for name, body in (("a.pt", b"x" * 1000), ("b.pt", b"y" * 10), ("meta.json", b"{}")):
        (tmp_path / name).write_bytes(body)
    names = checkpoint._files(str(tmp_path))
    shares = [checkpoint._digest_share(str(tmp_path), names, r, 2) for r in range(2)]  # two "ranks"
    checkpoint._write_json(str(tmp_path / checkpoint.MANIFEST), {"files": {**shares[0], **shares[1]}})
    found = lambda: sum((checkpoint.problems(str(tmp_path), r, 2) for r in range(2)), [])  # noqa: E731
    assert found() == []
    (tmp_path / "a.pt").write_bytes(b"x" * 500)
    (tmp_path / "b.pt").write_bytes(b"z" * 10)
    (tmp_path / "meta.json").unlink()
    assert sorted(found()) == ["a.pt has 500 bytes, the manifest says 1000", "b.pt does not match its checksum",
                               "meta.json is missing"]
    (tmp_path / checkpoint.MANIFEST).unlink()
    assert found()[0].startswith("manifest.json unreadable")


def test_which_checkpoints_load_through_the_universal_format(tmp_path):
    from recipes import checkpoint

    whole, shards = tmp_path / "whole", tmp_path / "shards"
    for d, names in ((whole, ["mp_rank_00_model_states.pt"]),
                     (shards, ["mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"])):
        d.mkdir()
        for n in names:
            (d / n).write_bytes(b"")
    need = lambda d, saved, world, stage: checkpoint.needs_universal(  # noqa: E731
        str(d), {"world_size": saved[0], "zero_stage": saved[1]}, world, stage)
    assert not need(whole, (2, 0), 4, 0)  # whole optimizer state: any world as is
    assert not need(shards, (2, 2), 2, 2)  # the same shape: DeepSpeed's own loader
    assert need(shards, (2, 2), 1, 2) and need(shards, (2, 2), 4, 1) and need(shards, (2, 3), 4, 3)
    for d, saved, stage, message in ((whole, (2, 0), 2, "between whole and partitioned"),
                                     (shards, (2, 2), 0, "between whole and partitioned"),
                                     (shards, (2, 3), 2, "cannot take it to zero_stage=2"),
                                     (shards, (2, 1), 3, "cannot take it to zero_stage=3")):
        with pytest.raises(checkpoint.CheckpointError, match=message):
            need(d, saved, 2, stage)
