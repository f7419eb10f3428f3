"""Sequence tiling (ringattn.models.tiling): tiled loss and MLP are exact, offload and
partitioned construction do what they say.

References: the loss and its gradients against float64 autograd on materialised logits
(fp32 tolerance 1e-5 relative: sums of a few hundred fp32 terms); tiled vs untiled fp32
models to 1e-5 (the same operations, differently grouped, so only summation order differs).
"""
from __future__ import annotations

import logging
import os

import pytest
import torch
import torch.nn.functional as F

from ringattn.models import Llama, LlamaConfig, tiling
from tests.distributed import run_distributed

REL = 1e-5


def _rel(got, want):
    return ((got.double() - want.double()).abs().max() / want.double().abs().max().clamp_min(1e-30)).item()


def _case(n_tokens=45, dim=16, vocab=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(3, n_tokens // 3, dim, generator=g)
    w = torch.randn(vocab, dim, generator=g) * 0.5
    labels = torch.randint(0, vocab, (3, n_tokens // 3), generator=g)
    labels[0, :4] = tiling.IGNORE_INDEX
    labels[2, -1] = tiling.IGNORE_INDEX
    return h, w, labels


@pytest.mark.parametrize("tile", [1, 7, 15, 45, 1000])
def test_tiled_loss_matches_float64(tile):
    h, w, labels = _case()
    h32, w32 = h.clone().requires_grad_(), w.clone().requires_grad_()
    out = tiling.token_loss(h32, w32, labels, tile_tokens=tile)
    g = torch.tensor(0.7)  # a non-unit upstream gradient
    (out.loss_sum * g).backward()

    h64, w64 = h.double().requires_grad_(), w.double().requires_grad_()
    logits = (h64 @ w64.T).flatten(0, 1)
    ref = F.cross_entropy(logits, labels.flatten(), ignore_index=-100, reduction="sum")
    (ref * 0.7).backward()
    assert out.loss_sum.dtype == torch.float32
    assert abs(out.loss_sum.item() - ref.item()) / ref.item() < REL
    assert _rel(h32.grad, h64.grad) < REL and _rel(w32.grad, w64.grad) < REL
    valid = labels.flatten() != -100
    assert out.correct.item() == int((logits.argmax(-1) == labels.flatten())[valid].sum())
    assert (h32.grad[0, :4] == 0).all(), "ignored tokens get no gradient"


@pytest.mark.parametrize("tile", [1, 7])
def test_tiled_loss_bf16_weight_grad_accumulated_in_fp32(tile):
    """bf16: each tile's dW is summed in fp32 (not rounded to bf16 per tile), so the weight
    gradient is the exact sum rounded once. A zero head makes the logits, softmax (1/64) and
    logit gradients (1/64, -63/64) exact in bf16, so the dW sum is the only rounding left;
    rounding each tile's dW to bf16 first was off by up to 0.55 % of max|dW| here."""
    n, dim, vocab = 96, 32, 64
    g = torch.Generator().manual_seed(0)
    h = torch.randn(1, n, dim, generator=g).bfloat16().requires_grad_()
    w = torch.zeros(vocab, dim, dtype=torch.bfloat16, requires_grad=True)
    labels = torch.randint(0, vocab, (1, n), generator=g)
    tiling.token_loss(h, w, labels, tile_tokens=tile).loss_sum.backward()
    dlogits = torch.full((n, vocab), 1.0 / vocab, dtype=torch.float64)
    dlogits[torch.arange(n), labels[0]] -= 1
    ref = dlogits.T @ h.detach()[0].double()
    assert w.grad.dtype == torch.bfloat16
    # the fp32 sum of ~96 terms may differ from float64 by ~1e-6 relative, which can move
    # a rounding: allow one bf16 ulp of the reference (8 significant bits)
    ulp = torch.ldexp(torch.ones_like(ref), torch.frexp(ref)[1] - 8)
    err = (w.grad.double() - ref).abs()
    assert (err <= ulp + 1e-6 * ref.abs().max()).all(), (err / ulp).max()


def test_matmul_fp32_cuda_call_contract_on_meta():
    """The CUDA branch's call, checked where it can run: the meta device has the same overload
    (shape and dtype rules). With a torch that lacks it, CUDA must take the upcast path."""
    a = torch.empty(64, 96, dtype=torch.bfloat16, device="meta")
    b = torch.empty(96, 32, dtype=torch.bfloat16, device="meta")
    if not tiling._MM_OUT_DTYPE:
        pytest.skip("this torch has no aten::mm.dtype: CUDA takes the upcast path tested above")
    got = torch.mm(a, b, out_dtype=torch.float32)
    assert got.dtype == torch.float32 and got.shape == (64, 32)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: the fp32-output half-precision GEMM "
                    "(torch.mm out_dtype) exists only there; the CPU upcast path is tested above")
def test_matmul_fp32_cuda_equals_exact_upcast():
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(64, 96, generator=g).bfloat16(), torch.randn(96, 32, generator=g).bfloat16())
    got = tiling._matmul_fp32(a.cuda(), b.cuda())
    assert got.dtype == torch.float32
    ref = a.double() @ b.double()  # products of bf16 are exact; only the fp32 sum rounds
    assert ((got.cpu().double() - ref).abs().max() / ref.abs().max()).item() < 1e-5


def test_tiled_equals_untiled_and_auto_tile_size():
    h, w, labels = _case()
    a = tiling.token_loss(h, w, labels, tile_tokens=4)
    b = tiling.token_loss(h, w, labels, tiled=False)
    assert abs(a.loss_sum.item() - b.loss_sum.item()) / b.loss_sum.item() < REL and a.correct == b.correct
    assert tiling.loss_tile_tokens(32000) == tiling.TILE_BYTES // (4 * 32000)  # fp32 tile logits ~ budget
    assert tiling.loss_tile_tokens(128256) * 128256 * 4 <= tiling.TILE_BYTES
    with pytest.raises(ValueError, match="tile_tokens=0"):
        tiling.token_loss(h, w, labels, tile_tokens=0)
    with pytest.raises(ValueError, match="labels shape"):
        tiling.token_loss(h, w, labels[:, 1:])


def test_tiled_loss_keeps_no_logits():
    """Only the hidden states, head and a 4-byte lse per token are saved for backward."""
    h, w, labels = _case(n_tokens=300, vocab=400)
    h.requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        tiling.token_loss(h, w, labels, tile_tokens=10)
    assert max(saved) == w.numel() and sum(saved) <= h.numel() + w.numel() + 2 * 300, saved


def _llama(**kw):
    cfg = dict(vocab_size=61, dim=32, n_layers=2, n_heads=4, n_kv_heads=2)
    cfg.update(kw)
    torch.manual_seed(0)
    return Llama(LlamaConfig(**cfg))


def _loss_and_grads(model, tokens, labels):
    model.zero_grad(set_to_none=True)
    out = model(tokens, torch.arange(tokens.shape[1]), labels=labels)
    out.loss_sum.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("tied", [False, True])
def test_llama_tiled_loss_mlp_offload_equal_untiled(tied):
    """forward(labels=...) tiled (loss, MLP, checkpointing with the offload flag) == untiled."""
    tokens = torch.randint(0, 61, (2, 40), generator=torch.Generator().manual_seed(1))
    labels = torch.roll(tokens, -1, 1)
    labels[:, -1] = -100
    ref_model = _llama(tiled_loss=False, tie_embeddings=tied)
    ref, ref_grads = _loss_and_grads(ref_model, tokens, labels)
    logits = ref_model(tokens, torch.arange(40))
    assert abs(F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum").item()
               - ref.loss_sum.item()) < 1e-3
    for kw in ({"loss_tile_tokens": 7}, {"loss_tile_tokens": 7, "tiled_mlp": True, "mlp_tile_tokens": 6},
               {"tiled_mlp": True, "mlp_tile_tokens": 9, "activation_checkpointing": True,
                "offload_activations": True}):
        model = _llama(tie_embeddings=tied, **kw)
        assert model.state_dict().keys() == ref_model.state_dict().keys()
        got, grads = _loss_and_grads(model, tokens, labels)
        assert abs(got.loss_sum.item() - ref.loss_sum.item()) / ref.loss_sum.item() < REL, kw
        assert got.correct == ref.correct
        for n in ref_grads:
            assert _rel(grads[n], ref_grads[n]) < REL, (kw, n)


def test_tiled_mlp_grads_and_ds_flag():
    """TiledMLP: output, input and parameter gradients of the wrapped SwiGLU, every tile
    recomputed; the ZeRO 'gradient complete' flag is set only for the last tile."""
    from ringattn.models.llama import FeedForward

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=8, dim=16, n_heads=2)
    ffn = FeedForward(cfg).double()
    x = torch.randn(2, 23, 16, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(2, 23, 16, dtype=torch.float64)
    y = ffn(x)
    y.backward(dy)
    ref_x, ref_p = x.grad.clone(), [p.grad.clone() for p in ffn.parameters()]
    ffn.zero_grad()
    x.grad = None
    tiled = tiling.TiledMLP(ffn, tile_tokens=5)
    calls = []
    ffn.register_forward_hook(lambda m, i, o: calls.append((i[0].shape[1], ffn.w1.weight.ds_grad_is_ready
                                                            if hasattr(ffn.w1.weight, "ds_grad_is_ready") else None)))
    yt = tiled(x)
    assert torch.allclose(yt, y, rtol=1e-12, atol=1e-15)
    yt.backward(dy)
    assert torch.allclose(x.grad, ref_x, rtol=1e-12, atol=1e-12)
    for p, r in zip(ffn.parameters(), ref_p):
        assert torch.allclose(p.grad, r, rtol=1e-12, atol=1e-12)
    widths = [c[0] for c in calls]
    assert widths == [5, 5, 5, 5, 3] * 2, widths  # forward tiles, then each tile recomputed
    assert [c[1] for c in calls[5:]] == [False, False, False, False, True]
    assert dict(tiled.named_parameters()).keys() == dict(ffn.named_parameters()).keys()
    calls.clear()
    with torch.no_grad():  # evaluation / a reentrant checkpoint's first pass: tiled as well
        assert torch.allclose(tiled(x), y, rtol=1e-12, atol=1e-15)
    assert [c[0] for c in calls] == [5, 5, 5, 5, 3]
    with pytest.raises(ValueError, match="tile_tokens or the ffn width"):
        tiling.TiledMLP(ffn)


def test_offload_is_a_noop_on_cpu_that_says_so_once(caplog, monkeypatch):
    monkeypatch.setattr(tiling, "_said_cpu", False)
    with caplog.at_level(logging.INFO, logger=tiling.log.name):
        for _ in range(3):
            with tiling.activation_offload(torch.device("cpu")):
                pass
    assert sum("nothing to offload" in r.message for r in caplog.records) == 1
    with pytest.raises(ValueError, match="activation_checkpointing=true"):
        LlamaConfig(vocab_size=8, offload_activations=True).validate()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host offload of saved tensors needs CUDA (no GPU here)")
def test_offload_moves_checkpointed_inputs_to_host_cuda():
    """With offload the device keeps no per-layer saved input: peak memory drops by ~ one
    hidden state per layer (n_layers x tokens x dim x 4 bytes)."""
    tokens = torch.randint(0, 61, (1, 4096), device="cuda")
    labels = torch.roll(tokens, -1, 1)
    peaks = {}
    for offload in (False, True):
        model = _llama(n_layers=8, dim=256, n_heads=4, activation_checkpointing=True,
                       offload_activations=offload).cuda()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        model(tokens, torch.arange(4096, device="cuda"), labels=labels).loss_sum.backward()
        torch.cuda.synchronize()
        peaks[offload] = torch.cuda.max_memory_allocated() - base
    saved = 8 * 4096 * 256 * 4
    assert peaks[False] - peaks[True] > 0.5 * saved, peaks


def test_hf_tiled_loss_and_mlp_equal_untiled():
    """HFCausalLM(labels=...): base model + head per tile == transformers' logits + CE, with
    tied embeddings too; tiled MLPs keep the parameter names."""
    pytest.importorskip("transformers")
    import ringattn
    from ringattn.models.hf import HFCausalLM
    from tests.test_hf import tiny_config

    from transformers import AutoModelForCausalLM

    tokens = torch.randint(0, 97, (2, 24), generator=torch.Generator().manual_seed(3))
    labels = torch.roll(tokens, -1, 1)
    labels[:, -1] = -100
    for arch, tie in (("llama", False), ("qwen2", True)):
        config = tiny_config(arch)
        config.tie_word_embeddings = tie
        results = []
        for tiled in (False, True):
            torch.manual_seed(0)
            hf = AutoModelForCausalLM.from_config(config).float()
            m = HFCausalLM(hf, ringattn.SequenceParallel("ring", layout="contiguous"), tiled_loss=tiled,
                           loss_tile_tokens=5)
            names = sorted(n for n, _ in m.named_parameters())
            if tiled:
                assert m.tile_mlps(tile_tokens=7) == config.num_hidden_layers
                assert sorted(n for n, _ in m.named_parameters()) == names
            out = m(tokens, torch.arange(24), labels=labels)
            out.loss_sum.backward()
            results.append((out, {n: p.grad.clone() for n, p in m.named_parameters()}))
        (ref, ref_g), (got, got_g) = results
        assert abs(got.loss_sum.item() - ref.loss_sum.item()) / ref.loss_sum.item() < REL, arch
        assert got.correct == ref.correct
        for n in ref_g:
            assert _rel(got_g[n], ref_g[n]) < REL, (arch, n)


def _zero3_build(rank, world):
    import deepspeed

    import ringattn
    from recipes import models

    os.environ.update(LOCAL_RANK=str(rank), RANK=str(rank), WORLD_SIZE=str(world))  # as a launcher sets
    deepspeed.init_distributed(dist_backend="gloo")
    sp = ringattn.SequenceParallel("ring", layout="zigzag")
    cfg = LlamaConfig(vocab_size=512, dim=128, n_layers=8, n_heads=4)
    ds = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
          "zero_optimization": {"stage": 3}}
    out = {}
    for stage in (0, 3):
        torch.manual_seed(0)
        params = list(models.LlamaModel(cfg).build(sp, torch.device("cpu"), ds if stage == 3 else {}).parameters())
        # bytes of parameter storage this rank holds right after construction
        out[stage] = sum((p.ds_tensor if stage == 3 else p).untyped_storage().nbytes() for p in params)
        if stage == 3:
            out["whole_numel"] = sum(p.ds_numel for p in params)
            out["data_numel"] = sum(p.numel() for p in params)  # partitioned: placeholders only
            with deepspeed.zero.GatheredParameters(params):  # the same weights as built whole
                out["weights"] = [p.detach().clone() for p in params]
        else:
            out["weights_ref"] = [p.detach().clone() for p in params]
    return out


def test_llama_built_partitioned_under_zero3():
    """ZeRO-3 over 2 ranks: the parameter storage each rank holds right after construction is
    half of the whole model (measured from the storages), and the weights are those of the
    whole build (each module initialises itself as it is built)."""
    pytest.importorskip("deepspeed")
    for r in run_distributed(_zero3_build, 2, timeout=180):
        assert r[0] == r["whole_numel"] * 4
        assert r[3] == pytest.approx(r[0] / 2, rel=0.01), (r[0], r[3])
        assert r["data_numel"] == 0
        for a, b in zip(r["weights"], r["weights_ref"], strict=True):
            assert torch.equal(a, b)


@pytest.mark.slow  # recipe training runs at sp=1 and sp=2
# "llama" passes too; our Llama's tiles are checked against the untiled model in this file's
# unit tests, and every recipe run of tests/test_train.py trains it tiled
@pytest.mark.parametrize("kind", ["hf"])
def test_recipe_tiled_equals_untiled_sp1_sp2(tmp_path, kind):
    """recipes.train, 3 steps: tiled loss + tiled MLP (several tiles per micro-batch) at sp=1
    and at sp=2 give the losses and accuracy of the untiled model at sp=1 (1e-4 relative)."""
    from tests.test_hf import _recipe, _save_tiny
    from tests.train_launch import FAST, assert_losses_close, metrics

    over = [o for o in FAST if not o.startswith("model=")] + ["trainer.max_steps=3", "trainer.seed=2"]
    over += ["model=tiny"] if kind == "llama" else ["model=hf", f"model.path={_save_tiny('llama', tmp_path / 'base')}"]
    tiled = ["model.loss_tile_tokens=8", "model.tiled_mlp=true", "model.mlp_tile_tokens=8"]
    _recipe("recipes.train", tmp_path / "untiled", 1, over + ["model.tiled_loss=false"])
    ref = metrics(tmp_path / "untiled")
    for sp in (1, 2):
        _recipe("recipes.train", tmp_path / f"tiled_sp{sp}", sp, over + tiled + [f"parallel.sp_size={sp}"])
        got = metrics(tmp_path / f"tiled_sp{sp}")
        assert sorted(ref) == sorted(got) == [1, 2, 3]
        assert_losses_close(ref, got, [1, 2, 3], rel=1e-4)
        assert got[3]["accuracy"] == ref[3]["accuracy"]
