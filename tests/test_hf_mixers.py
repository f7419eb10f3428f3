"""Hybrid transformers models (linear attention, Mamba/Mamba2, short convolutions beside softmax
attention) through ``HFCausalLM``: the recurrent mixers run under their schemes
(``ringattn.models.mixers``: Gated DeltaNet head-parallel, short convolutions over a halo, the
rest over the gathered sequence) and match the stock model exactly.

Every family of transformers 5.x with a recurrent mixer, as a tiny random fp32 config: logits,
loss and the parameter gradients summed over ranks within 1e-5 relative of the stock model on
one process (eager attention, the full sequence; with packed documents each document run
alone), under layouts zigzag, contiguous and doc_zigzag (packed documents), the softmax layers
under ring, Ulysses, all-gather and hybrid. One spawned run checks many (family, case) pairs.
"""
from __future__ import annotations

import dataclasses
import inspect
import math

import pytest
import torch
import torch.nn.functional as F

from tests.distributed import run_distributed
from tests.test_hf import VOCAB, _rel, _shift_labels

TOL = 1e-5
DOCS = [5, 9, 2, 16]  # packed document lengths (32 tokens: every layout splits them at P <= 4)


def mixer_config(arch: str):
    """Two layers (a mixer layer and a softmax one where the family has both), 32 wide."""
    import transformers as tf

    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  attention_dropout=0.0, pad_token_id=0)
    mixed = ["linear_attention", "full_attention"]
    gdn = dict(head_dim=8, layer_types=mixed, linear_num_value_heads=4, linear_num_key_heads=2,
               linear_key_head_dim=8, linear_value_head_dim=8)
    mamba2 = dict(mamba_n_heads=4, mamba_d_head=16, mamba_d_state=8, mamba_n_groups=2,
                  mamba_chunk_size=8)
    # Kimi-Linear and Bailing-Hybrid put MLA beside their linear layers: all linear layers
    # here, and with an MLA layer of real-checkpoint proportions (v's head size 16 against
    # q/k's 16 + 8) in the "@mla" configs
    mla_layers = dict(layer_types=["linear_attention", "full_attention"], kv_lora_rank=8,
                      qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16)
    mla_free = dict(head_dim=8, linear_head_dim=8, linear_num_heads=4, num_experts=2,
                    num_experts_per_token=1, moe_intermediate_size=16, mlp_layer_types=["dense"] * 2,
                    layer_types=["linear_attention"] * 2, num_key_value_heads=4)
    # initializer_range 0.2 where the default leaves the mixer's reach across a document
    # boundary below 1e-4 of the logits (the negative control needs it visible)
    configs = {
        "qwen3_next": lambda: tf.Qwen3NextConfig(**common, **gdn, num_experts=0),
        "qwen3_5": lambda: tf.Qwen3_5TextConfig(**common, **gdn),
        # 6 key heads (2 value heads each) over 4 ranks: the head-parallel split is uneven
        "qwen3_5@6heads": lambda: tf.Qwen3_5TextConfig(**common, **{
            **gdn, "linear_num_key_heads": 6, "linear_num_value_heads": 12}),
        # 3 key heads over 4 ranks: neither whole heads nor equal value-channel slices
        "qwen3_5@3heads": lambda: tf.Qwen3_5TextConfig(**common, **{
            **gdn, "linear_num_key_heads": 3, "linear_num_value_heads": 6}),
        # 1 key head (2 value heads) over 2 ranks: each rank runs half of every value channel
        "qwen3_next@1key": lambda: tf.Qwen3NextConfig(**common, **{
            **gdn, "linear_num_key_heads": 1, "linear_num_value_heads": 2}, num_experts=0),
        "olmo_hybrid": lambda: tf.OlmoHybridConfig(**common, layer_types=mixed),
        "kimi_linear": lambda: tf.KimiLinearConfig(**{**common, **mla_free}),
        "bailing_hybrid": lambda: tf.BailingHybridConfig(**{**common, **mla_free}, layer_group_size=2,
                                                         num_nextn_predict_layers=0),
        # block_size 8: the lightning recurrence crosses blocks within a document
        "kimi_linear@mla": lambda: tf.KimiLinearConfig(**{**common, **mla_free, **mla_layers}),
        "bailing_hybrid@mla": lambda: tf.BailingHybridConfig(**{**common, **mla_free, **mla_layers},
                                                             layer_group_size=2, num_nextn_predict_layers=0),
        "minimax": lambda: tf.MiniMaxConfig(**common, head_dim=8, layer_types=mixed, block_size=8),
        "nemotron_h": lambda: tf.NemotronHConfig(
            **{k: v for k, v in common.items() if k != "num_hidden_layers"},
            layers_block_type=["mamba", "attention", "mlp"], mamba_num_heads=4, mamba_head_dim=8,
            ssm_state_size=8, n_groups=2, chunk_size=8, head_dim=8),
        "granitemoehybrid": lambda: tf.GraniteMoeHybridConfig(**common, layer_types=mixed, **mamba2,
                                                              num_local_experts=0),
        "bamba": lambda: tf.BambaConfig(**common, attn_layer_indices=[1], **mamba2),
        # 12 heads in 3 groups: over 2 or 4 ranks a rank's heads straddle its groups unevenly
        "bamba@12heads": lambda: tf.BambaConfig(**{**common, "hidden_size": 48}, attn_layer_indices=[1], **{
            **mamba2, "mamba_n_heads": 12, "mamba_d_head": 8, "mamba_n_groups": 3}),
        "falcon_h1": lambda: tf.FalconH1Config(**common, **mamba2, mamba_d_ssm=64, head_dim=8),
        "jamba": lambda: tf.JambaConfig(**common, attn_layer_period=2, attn_layer_offset=1,
                                        expert_layer_period=2, expert_layer_offset=1, num_experts=2,
                                        mamba_d_state=8, mamba_d_conv=4, mamba_expand=2,
                                        initializer_range=0.2),
        "zamba2": lambda: tf.Zamba2Config(**common, layers_block_type=["mamba", "hybrid"],
                                          mamba_d_state=8, mamba_headdim=8, n_mamba_heads=8,
                                          mamba_ngroups=2, chunk_size=8, num_mem_blocks=1,
                                          use_mem_rope=False),
        "lfm2": lambda: tf.Lfm2Config(**common, layer_types=["conv", "full_attention"],
                                      initializer_range=0.2),
        "lfm2_moe": lambda: tf.Lfm2MoeConfig(**common, layer_types=["conv", "full_attention"],
                                             initializer_range=0.2,
                                             num_experts=2, num_experts_per_tok=1,
                                             moe_intermediate_size=16, num_dense_layers=1),
    }
    return configs[arch]()


FAMILIES = ("qwen3_next", "qwen3_5", "olmo_hybrid", "kimi_linear", "bailing_hybrid", "minimax",
            "nemotron_h", "granitemoehybrid", "bamba", "falcon_h1", "jamba", "zamba2", "lfm2",
            "lfm2_moe")


def mixer_model(arch: str, seed: int = 0):
    import transformers
    from transformers import AutoModelForCausalLM

    transformers.logging.set_verbosity_error()  # the kernels' "falling back to PyTorch" notes
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(mixer_config(arch), attn_implementation="eager")
    return model.float().eval()


def _documents():
    cu = torch.tensor([0, *torch.tensor(DOCS).cumsum(0).tolist()], dtype=torch.int32)
    return cu, list(zip(cu[:-1].tolist(), cu[1:].tolist()))


def _reference(model, tokens, docs):
    """The stock model on one process: logits, token-loss sum / valid, parameter gradients."""
    if docs:  # each document alone: the recurrent state starts at zero in every document
        _, spans = _documents()
        logits = torch.cat([model(input_ids=tokens[:, a:b], use_cache=False).logits
                            for a, b in spans], dim=1)
    else:
        logits = model(input_ids=tokens, use_cache=False).logits
    labels = _labels(tokens, docs)
    loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100,
                           reduction="sum") / (labels != -100).sum()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return logits.detach(), loss.detach(), grads


def _labels(tokens, docs):
    if not docs:
        return _shift_labels(tokens)
    _, spans = _documents()
    labels = torch.full_like(tokens, -100)
    for a, b in spans:
        labels[:, a:b - 1] = tokens[:, a + 1:b]
    return labels


def _mixer_cases(rank, world, cases):
    """Each (arch, strategy, layout, docs) -> {quantity: relative error} on this rank."""
    import torch.distributed as dist

    import ringattn
    from ringattn.models.hf import HFCausalLM

    results = {}
    for arch, strategy, layout, docs in cases:
        model = mixer_model(arch)
        seqlen = sum(DOCS) if docs else 16 * world
        tokens = torch.randint(0, VOCAB, (1 if docs else 2, seqlen),
                               generator=torch.Generator().manual_seed(1))
        ref_logits, ref_loss, ref_grads = _reference(model, tokens, docs)
        cu = _documents()[0] if docs else None
        strategy, ckpt = strategy.removesuffix("+ckpt"), strategy.endswith("+ckpt")
        kw = {"ulysses_size": 2} if strategy == "hybrid" else {}
        sp = ringattn.SequenceParallel(strategy, layout=layout, **kw)
        wrapped = HFCausalLM(model, sp)
        if ckpt:  # the mixers run again in backward (the recompute reads the same index)
            wrapped.enable_checkpointing()
            wrapped.train()
        labels = _labels(tokens, docs)
        x, y = sp.shard(tokens, cu_seqlens=cu), sp.shard(labels, cu_seqlens=cu)
        logits = wrapped(x, sp.positions(seqlen, cu_seqlens=cu), cu)
        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-100,
                               reduction="sum") / (labels != -100).sum()
        loss.backward()
        loss = loss.detach()
        dist.all_reduce(loss)
        for n, p in model.named_parameters():  # summed over ranks (the SP gradient reduction)
            if p.grad is None:  # a parameter the loss does not reach
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad)
        ref_grads.update({n: torch.zeros_like(p) for n, p in model.named_parameters()
                          if n not in ref_grads})
        case = (arch, strategy + "+ckpt" * ckpt, layout, docs)
        results[case] = {
            "logits": _rel(logits.detach(), sp.shard(ref_logits, cu_seqlens=cu)),
            "loss": abs(loss.item() - ref_loss.item()) / abs(ref_loss.item()),
            "grads": _grad_error(model, ref_grads), "grad_norm": _grad_norm_error(model, ref_grads),
            "schemes": sorted(set(wrapped._mixers.schemes().values()))}
        # negative controls: the mixers on this rank's shard alone, or over the packed
        # sequence without restarting at each document, are far off (the match is not vacuous;
        # the halo scheme's document restarts: test_packed_documents_restart_...)
        with torch.no_grad():
            if docs and not wrapped._mixers.halos:
                mixers, planned = wrapped._mixers, type(wrapped._mixers).plan
                mixers.plan = lambda sp_, shape, cu_, device: dataclasses.replace(
                    planned(mixers, sp_, shape, cu_, device), index=_index_across_documents(sp_, shape, cu_))
            else:
                wrapped._mixers.remove()
            wrong = wrapped(x, sp.positions(seqlen, cu_seqlens=cu), cu)
        control = torch.tensor(_rel(wrong, sp.shard(ref_logits, cu_seqlens=cu)))
        dist.all_reduce(control, op=dist.ReduceOp.MAX)  # a rank may hold whole documents only
        results[case]["control"] = control.item()
    return results


def _index_across_documents(sp, shape, cu):
    """A ``MixerIndex`` that places tokens by the documents (doc_zigzag) but runs the mixer
    over the packed sequence as one (the state crosses document boundaries): wrong."""
    from ringattn.models.mixers import MixerIndex
    from ringattn.sharding import held_indices

    p = sp.world_size
    held = torch.cat([held_indices(sp.layout, shape[1] * p, p, r, 1, cu) for r in range(p)])
    return MixerIndex(torch.argsort(held), held, None, sp.group, p, sp.rank)


def _grad_error(model, ref_grads) -> float:
    """Largest |g - ref| over every parameter / largest |ref|: each parameter's gradient is
    not judged against its own scale, since some are pure rounding in the stock fp32 model
    itself (Qwen3.5's Gated DeltaNet ``A_log``: ~1e-6 of the largest gradient, 1.9e-4 off its
    own float64 value; an MoE gate under top-1 routing: ~1e-8)."""
    scale = max(float(g.abs().max()) for g in ref_grads.values())
    return max(float((p.grad - ref_grads[n]).abs().max()) for n, p in model.named_parameters()) / scale


def _grad_norm_error(model, ref_grads) -> float:
    """||g - ref|| / ||ref|| over every parameter's gradient (already summed over ranks)."""
    diff = sum(float((p.grad - ref_grads[n]).double().square().sum()) for n, p in model.named_parameters())
    norm = sum(float(ref_grads[n].double().square().sum()) for n, _ in model.named_parameters())
    return (diff / norm) ** 0.5


def _check(results):
    bad = {case: errs for case, errs in results.items()
           if max(v for k, v in errs.items() if k not in ("control", "schemes")) > TOL
           or errs["control"] < 10 * TOL}
    assert not bad, f"errors above {TOL} (or a negative control below {10 * TOL}): {bad}"


STRATEGIES = ("ring", "ulysses", "allgather")


def _cases_p2():
    """Every family: zigzag, contiguous with packed documents and doc_zigzag (documents), the
    softmax layers under each strategy in turn."""
    cases = []
    for i, arch in enumerate(FAMILIES):
        cases += [(arch, STRATEGIES[i % 3], "zigzag", False),
                  (arch, STRATEGIES[(i + 1) % 3], "contiguous", True),
                  (arch, STRATEGIES[(i + 2) % 3], "doc_zigzag", True)]
    # activation checkpointing: transformers recomputes each layer's forward in backward;
    # striped: every short-convolution halo token is on another rank
    # Kimi-Linear and Bailing-Hybrid with their MLA layers (v's head size unlike q/k's)
    return cases + [("jamba", "ring+ckpt", "zigzag", True), ("qwen3_next", "allgather+ckpt", "doc_zigzag", True),
                    ("qwen3_next@1key", "ring", "doc_zigzag", True),
                    ("lfm2", "ring+ckpt", "striped", False), ("kimi_linear@mla", "ring", "doc_zigzag", True),
                    ("bailing_hybrid@mla", "ulysses", "zigzag", False)]


QUICK = [("qwen3_next", "ring", "zigzag", False), ("minimax", "ulysses", "doc_zigzag", True),
         ("bamba", "allgather", "contiguous", True), ("lfm2", "ring", "doc_zigzag", True)]


def test_hybrids_match_stock_sp2_quick():
    """One family of each kind (Gated DeltaNet, lightning, Mamba2, short conv) at sp=2."""
    for r in run_distributed(_mixer_cases, 2, QUICK, timeout=300):
        _check(r)


@pytest.mark.slow  # every family; the quick tier runs one of each kind
def test_every_hybrid_family_matches_stock_sp2():
    for r in run_distributed(_mixer_cases, 2, _cases_p2(), timeout=600):
        _check(r)


@pytest.mark.slow  # 4 ranks
def test_hybrids_match_stock_sp4():
    layouts = (("zigzag", False), ("doc_zigzag", True), ("contiguous", True))
    strategies = ("ring", "hybrid", "allgather", "ulysses")
    cases = [(arch, strategies[i % 4], *layouts[i % 3]) for i, arch in enumerate(FAMILIES)]
    cases += [("qwen3_5@6heads", "ring", "doc_zigzag", True), ("bamba@12heads", "ulysses", "zigzag", False),
              ("kimi_linear@mla", "hybrid", "contiguous", True), ("qwen3_5@3heads", "ring", "zigzag", False)]
    for r in run_distributed(_mixer_cases, 4, cases, timeout=600):
        _check(r)
        # Gated DeltaNet and Mamba2 run head-parallel where their heads cover the ranks (6 key
        # heads over 4: 2, 2, 1, 1; 12 Mamba2 heads in 3 groups: 3 a rank, straddling groups),
        # Gated DeltaNet in value-channel slices where its key heads divide the ranks
        # (Qwen3-Next's 2 key heads: each value head's 8 channels in halves), over the
        # gathered sequence where neither covers them (3 key heads over 4 ranks)
        schemes = {arch: errs["schemes"] for (arch, *_), errs in r.items()}
        assert schemes["qwen3_5@6heads"] == schemes["bamba@12heads"] == schemes["bamba"] \
            == schemes["bailing_hybrid"] == schemes["qwen3_next"] == ["heads"]
        assert schemes["jamba"] == ["heads"] and schemes["lfm2"] == ["halo"]
        assert schemes["qwen3_5@3heads"] == ["gathered"]


@pytest.mark.parametrize("arch", ["qwen3_5", "lfm2"])
def test_packed_documents_restart_the_mixers_on_one_process(arch):
    """No sequence parallelism at all: with cu_seqlens the mixers still restart at each
    document (the stock model, called on the packed sequence, would carry state across)."""
    from ringattn.models.hf import HFCausalLM

    model = mixer_model(arch)
    tokens = torch.randint(0, VOCAB, (1, sum(DOCS)), generator=torch.Generator().manual_seed(3))
    cu, spans = _documents()
    with torch.no_grad():
        want = torch.cat([model(input_ids=tokens[:, a:b], use_cache=False).logits for a, b in spans], 1)
        packed = model(input_ids=tokens, use_cache=False).logits
        import ringattn

        sp = ringattn.SequenceParallel.single()
        got = HFCausalLM(model, sp)(tokens, sp.positions(sum(DOCS), cu_seqlens=cu), cu)
    assert _rel(got, want) <= TOL
    assert _rel(packed, want) > 100 * TOL  # the documents matter in this test


def test_unknown_layer_types_are_refused_naming_them_not_mlp():
    """A layer type no mixer handles is named (Nemotron-H's mlp layers are not); a sequence
    convolution outside any known mixer is refused."""
    from ringattn.models.hf import HFCausalLM

    model = mixer_model("nemotron_h")
    HFCausalLM(model)  # mamba + attention + mlp: supported
    model.config.layer_types = ["linear_attention", "full_attention", "mlp", "retention"]
    with pytest.raises(ValueError, match=r"layer types \['retention'\] mix tokens") as err:
        HFCausalLM(model)
    assert "mlp" not in str(err.value).split("mix tokens")[0]
    model = mixer_model("lfm2")
    model.model.layers[1].self_attn.extra_conv = torch.nn.Conv1d(4, 4, 3)
    with pytest.raises(ValueError, match="sequence convolutions"):
        HFCausalLM(model)


def _save_tiny_hybrid(arch, path, vocab=272):
    """A tiny hybrid whose vocabulary covers the recipe's byte tokenizer (259 ids)."""
    from transformers import AutoModelForCausalLM

    config = mixer_config(arch)
    config.vocab_size = vocab
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    return str(path)


@pytest.mark.slow  # the recipe end to end, two runs each (~20 s)
@pytest.mark.parametrize("arch", ["qwen3_next", "bamba"])  # a Gated DeltaNet and a Mamba2 hybrid
def test_recipe_trains_hybrid_sp2_with_the_losses_of_one_process(tmp_path, arch):
    """model=hf from a local tiny hybrid: 3 steps at sp=2 give the losses and the final
    weights of one process (the recipe's wiring is the same for every family; each family's
    mixer is checked above)."""
    from tests.test_hf import _recipe
    from tests.train_launch import FAST, assert_losses_close, assert_weights_close, final_weights, metrics

    path = _save_tiny_hybrid(arch, tmp_path / "base")
    over = [o for o in FAST if not o.startswith("model=")]
    over += ["model=hf", f"model.path={path}", "trainer.max_steps=3", "trainer.seed=1",
             "trainer.save_every=3", "model.save_final=false"]
    _recipe("recipes.train", tmp_path / "sp1", 1, over)
    _recipe("recipes.train", tmp_path / "sp2", 2, over + ["parallel.sp_size=2"])
    ref, got = metrics(tmp_path / "sp1"), metrics(tmp_path / "sp2")
    assert sorted(ref) == sorted(got) == [1, 2, 3]
    assert_losses_close(ref, got, [1, 2, 3])
    assert_weights_close(final_weights(tmp_path / "sp1"), final_weights(tmp_path / "sp2"))


def test_capacity_planner_counts_the_mixers(tmp_path):
    """The planner measures a hybrid's mixer layers (their own module, on the CPU) and counts
    them per token they run over: this rank's tokens head-parallel or with a halo, the whole
    sequence where the heads do not cover the ranks; the measured figures themselves are
    checked against the recipe's peaks in tests/test_capacity.py."""
    from recipes import capacity, estimate
    from recipes.models import HFModel, HFModelConfig
    from ringattn.models import hf
    from ringattn.models.mixers import attention_beside_mixer
    from tests.test_capacity import _capacity_cfg

    class Bytes:
        vocab_size = 259

    gdn = HFModel(HFModelConfig(path=_save_tiny_hybrid("qwen3_next", tmp_path / "gdn")), Bytes())
    cost = {w: gdn.mixer_memory("fp32", w) for w in (1, 2, 8, 6)}  # 2 key heads, value heads of 8
    assert cost[1].families == ("gated_deltanet",) and cost[1].layers == 1  # layers: linear, full
    assert cost[1].recompute > 0 and cost[1].kept > 0 and cost[1].transient >= 0
    # head-parallel (2 ranks: a key head each): its share; 8 ranks: value channels in quarters,
    # each repeating its key head's q/k work (4 ranks a key head)
    assert cost[1].tokens_factor == cost[2].tokens_factor == 1.0 and cost[8].tokens_factor == 4.0
    assert cost[6].tokens_factor == 6  # 8 channels do not split in 3: the gathered sequence
    conv = HFModel(HFModelConfig(path=_save_tiny_hybrid("lfm2", tmp_path / "conv")), Bytes())
    assert conv.mixer_memory("fp32", 8).tokens_factor == 1.0  # halo: its own tokens
    # a layer that runs a mixer and softmax attention holds both working sets at once
    beside = {a: attention_beside_mixer(hf.empty_model(mixer_config(a))) for a in ("falcon_h1", "zamba2", "bamba")}
    assert beside == {"falcon_h1": True, "zamba2": True, "bamba": False}

    def mixer_term(world):
        e = estimate.estimate(gdn.shape, "fp32", 0, False, False, world_size=world, sp_size=world, micro=1,
                              seq_len=4096 * world, options=estimate.ActivationOptions(checkpointing=True),
                              mixers=cost[world])
        return dict((n, v) for n, v, _ in e.terms)["mixer backward"]

    assert mixer_term(6) == 6 * mixer_term(2)
    cfg = _capacity_cfg("model=hf", f"model.path={tmp_path / 'gdn'}", "model.activation_checkpointing=true",
                        "world_size=2", "device_gib=1", "device=cpu")
    rows = capacity.capacity_rows(cfg, gdn)
    assert rows and all(r["max_seq_len"] > 0 for r in rows)
    assert "gated_deltanet" in capacity.report(cfg, rows)


@pytest.mark.parametrize("layout, docs, most", [("contiguous", False, 1), ("zigzag", False, 2),
                                                ("doc_zigzag", True, 2 * 64)])
def test_short_conv_halo_is_a_few_tokens_per_segment(layout, docs, most):
    """The halo scheme's traffic and work, planned for rank 3 of 8 over 2^16 tokens (no
    processes): each rank sends at most k - 1 rows per neighbouring segment (``most``
    segments: 1 for contiguous, 2 for zigzag, 2 per document for doc_zigzag with 64
    documents), whatever the length, and runs the mixer over its own rows plus those halos."""
    from types import SimpleNamespace

    from ringattn.models.mixers import HaloIndex

    k, p, seqlen = 3, 8, 1 << 16
    cu = torch.linspace(0, seqlen, 65).round().to(torch.int32) if docs else None
    sp = SimpleNamespace(world_size=p, rank=3, layout=layout, strategy="ring", group=None)
    idx = HaloIndex.build(sp, (1, seqlen // p), cu, reach=k)
    assert 0 < len(idx.send) <= most * (k - 1)
    # equal documents here: the padding to the longest segment is at most a token a row
    assert len(idx.batch) <= seqlen // p + most * (k - 1) + sum(r for r, _ in idx.shapes)


def test_documents_run_in_batches_of_similar_length():
    """Packed documents as right-padded rows, batched by ceil(log2(length)): every document
    starts a row of its batch, no two share a slot, the padding stays under 2x the tokens and
    the batches (kernel calls per mixer layer) under log2(longest) + 2 -- on a long-tailed mix
    of 1M tokens where one batch padded to the longest document would be 10x the tokens and
    more; and a mixer index over it (rank 5 of 64, doc_zigzag) keeps every token once."""
    from types import SimpleNamespace

    from ringattn.models.mixers import MixerIndex, document_batches

    g = torch.Generator().manual_seed(0)
    lengths = torch.exp(torch.randn(2000, generator=g) * 1.5 + 7.5).long().clamp(min=1)
    lengths = lengths[: int(torch.searchsorted(lengths.cumsum(0), 1 << 20))]
    lengths = torch.cat([lengths, torch.tensor([(1 << 20) - int(lengths.sum())])])
    first, shapes = document_batches(lengths)
    tokens, padded = int(lengths.sum()), sum(r * n for r, n in shapes)
    assert tokens == 1 << 20 and padded < 2 * tokens
    assert len(lengths) * int(lengths.max()) > 10 * tokens  # one row per document, one batch
    assert len(shapes) <= math.log2(int(lengths.max())) + 2
    starts, offset = [], 0
    for rows, n in shapes:  # the slots where rows start
        starts += range(offset, offset + rows * n, n)
        offset += rows * n
    assert set(first.tolist()) <= set(starts) and len(set(first.tolist())) == len(lengths)
    slots = torch.repeat_interleave(first, lengths) + torch.arange(tokens) - torch.repeat_interleave(
        lengths.cumsum(0) - lengths, lengths)
    assert len(torch.unique(slots)) == tokens and int(slots.max()) < padded

    cu = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    sp = SimpleNamespace(world_size=64, rank=5, layout="doc_zigzag", strategy="ring", group=None)
    idx = MixerIndex.build(sp, (1, tokens // 64), cu)
    assert idx.shapes == shapes and len(idx.gather) == padded
    real = idx.gather[idx.gather < tokens]
    assert torch.equal(torch.sort(real).values, torch.arange(tokens))  # every gathered row once
    assert torch.equal(idx.gather[idx.ungather], torch.arange(tokens))  # and back again


def test_attention_function_alone_refuses_recurrent_mixers():
    """The attention function alone (use_ringattn, without HFCausalLM or the integrations'
    prepare_model installing the mixers) would run each mixer on its shard: refused, naming
    the mixer class."""
    from ringattn.models.hf import use_ringattn

    with pytest.raises(ValueError, match=r"recurrent mixers \(BambaMixer\).*HFCausalLM"):
        use_ringattn(mixer_model("bamba"))


@pytest.mark.parametrize("layout", ["contiguous", "zigzag", "striped", "doc_zigzag"])
def test_mixer_index_positions_are_the_layouts(layout):
    """The mixers' vectorised view of every rank's positions (from the layout's runs) is
    ``sharding.held_indices``, rank by rank (uneven documents, 3 and 4 ranks)."""
    from types import SimpleNamespace

    from ringattn.models.mixers import _held
    from ringattn.sharding import held_indices

    for p in (3, 4):
        seqlen = 24 * p
        cu = torch.tensor([0, 5, 9, 30, 31, 50, seqlen], dtype=torch.int32)
        sp = SimpleNamespace(world_size=p, rank=0, layout=layout, strategy="ring", group=None)
        for r, got in enumerate(_held(sp, seqlen, cu)):
            assert torch.equal(got, held_indices(layout, seqlen, p, r, 1, cu)), (p, r)


def _plan_ahead_and_bytes(rank, world, arch, layout):
    """The mixers' permutations come with ``build_plan`` (the forward builds none), and a
    head-parallel layer sends the bytes ``mixer_heads.bytes_sent`` states (the gathered
    sequence's (P-1) x S/P x D x e when told to gather)."""
    import ringattn
    from ringattn import profile
    from ringattn.models.hf import HFCausalLM
    from ringattn.models.mixer_heads import bytes_sent

    model = mixer_model(arch)
    sp = ringattn.SequenceParallel("ring", layout=layout)
    wrapped = HFCausalLM(model, sp)
    cu, _ = _documents()
    tokens = torch.randint(0, VOCAB, (1, sum(DOCS)), generator=torch.Generator().manual_seed(4))
    x, pos = sp.shard(tokens, cu_seqlens=cu), sp.positions(sum(DOCS), cu_seqlens=cu)
    plan = wrapped.build_plan(x.shape, cu, device=x.device)
    assert plan.mixers is not None
    with torch.no_grad():
        want = wrapped(x, pos, cu)

        def planned_again(*a, **k):
            raise AssertionError("the forward planned the mixers again")

        wrapped._mixers.plan = planned_again
        got = wrapped(x, pos, cu, plan=plan)
        assert torch.equal(got, want)

        name, mixer = next(iter(wrapped._mixers.mixers.items()))
        hidden = torch.randn(1, x.shape[1], model.config.hidden_size)
        sent = {}
        for scheme in ("heads", "gathered"):
            if scheme == "gathered":  # as with fewer heads than ranks
                plan = dataclasses.replace(plan, mixers=dataclasses.replace(
                    plan.mixers, splits={id(mixer): None}))
            wrapped._mixers.use(plan.mixers)
            assert wrapped._mixers.schemes()[name] == scheme
            with profile.RingProfile() as prof:  # MiniMax's layer also takes these two
                mixer(hidden, **{k: None for k in ("position_embeddings", "attention_mask")
                                 if k in inspect.signature(type(mixer).forward).parameters})
            sent[scheme] = prof.bytes_sent
    seqlen = sum(DOCS)
    return sent, bytes_sent(mixer, seqlen, world, 4, rank), \
        (world - 1) * seqlen // world * model.config.hidden_size * 4


@pytest.mark.slow  # the quick tier checks the schemes' exactness (test_hybrids_match_stock_sp2_quick)
@pytest.mark.parametrize("arch, layout", [
    ("qwen3_5", "doc_zigzag"),
    pytest.param("qwen3_next@1key", "zigzag", marks=pytest.mark.slow),  # value-channel slices
    pytest.param("bamba@12heads", "zigzag", marks=pytest.mark.slow),
    pytest.param("kimi_linear", "contiguous", marks=pytest.mark.slow),
    # lightning attention's one all-to-all each way is Gated DeltaNet's shape (passed, not rerun)
    pytest.param("jamba", "doc_zigzag", marks=pytest.mark.slow)])
def test_plan_ahead_and_head_parallel_bytes_sent(arch, layout):
    """Gated DeltaNet; Mamba2 with groups shared by two ranks (their B, C sent to both); KDA
    (two all-to-alls); Mamba channel-parallel (all-to-alls and a sum)."""
    for sent, heads, gathered in run_distributed(_plan_ahead_and_bytes, 2, arch, layout, timeout=180):
        assert sent == {"heads": heads, "gathered": gathered}
