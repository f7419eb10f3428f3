"""Multi-head latent attention (MLA: DeepSeek-V3, LongCat-Flash): v's head size differs from
q/k's (192 = 128 nope + 64 rope against 128 in every DeepSeek-V3 checkpoint).

Kernels: math and sdpa, v narrower and wider than q/k, forward and backward (as the ring
drives it: from the final out and lse) against the float64 reference (tests/reference.py,
which takes any v head size), fp32 within 1e-5 and float64 to rounding. flash-attn's rule
(one head size) and its padding: tests/test_flash_attn_rules.py and the "mla" blocks and
matrix rows of tests/flash_attn_checks.py. Strategies: ring, Ulysses, hybrid and all-gather
on every layout (doc_zigzag with packed documents), with windows, sinks and softcap, at P=2.
Decode over a cache whose v is narrower. Models: tests/test_hf_architectures.py.
"""
from __future__ import annotations

import itertools

import pytest
import torch
import torch.distributed as dist

import ringattn
from ringattn.kernels import BACKENDS
from tests.distributed import run_distributed
from tests.flash_attn_checks import _held
from tests.reference import reference_attention, rel_err
from tests.test_documents_windows import cu_of, dense_mask

FP32_TOL = 1e-5
DOCS = [3, 9, 1, 11]  # 24 tokens: every layout splits them at P = 2


def _randn(gen, *shape):
    return torch.randn(*shape, generator=gen, dtype=torch.float64)


def _kernel_case(gen, sq, sk, dqk, dv, h=4, hk=2):
    return _randn(gen, 2, sq, h, dqk), _randn(gen, 2, sk, hk, dqk), _randn(gen, 2, sk, hk, dv), \
        _randn(gen, 2, sq, h, dv)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", ["math", "sdpa"])
def test_kernels_with_value_head_size_unlike_query_key(name, dtype):
    """Full, causal, a window band, packed sequences (varlen) and, on math, softcap; v of 16
    against q/k of 24 (MLA's proportion) and v of 24 against 16 (the other padding side)."""
    kernel, gen = BACKENDS[name], torch.Generator().manual_seed(0)
    tol = FP32_TOL if dtype == torch.float32 else 1e-12
    segments = ((0, 4, 9), (0, 6, 11))
    blocks = [dict(causal=False), dict(causal=True), dict(causal=False, window=(3, 0)),
              dict(causal=False, segments=segments)]
    if name == "math":
        blocks.append(dict(causal=True, softcap=2.0))
    for (dqk, dv), kw in itertools.product(((24, 16), (16, 24)), blocks):
        sq, sk = (9, 11) if "segments" in kw else (9, 9)
        q, k, v, do = _kernel_case(gen, sq, sk, dqk, dv)
        visible = torch.ones(sq, sk, dtype=torch.bool)
        if kw.get("window"):
            visible = dense_mask([sq], kw["window"], False)
        if kw.get("segments"):
            visible = torch.zeros(sq, sk, dtype=torch.bool)
            for s in range(2):
                visible[segments[0][s]:segments[0][s + 1], segments[1][s]:segments[1][s + 1]] = True
        ref = reference_attention(q, k, v, do, causal=kw["causal"], scale=0.3, mask=visible,
                                  softcap=kw.get("softcap"))
        q, k, v, do = (t.to(dtype) for t in (q, k, v, do))
        out, lse = kernel.forward(q, k, v, scale=0.3, **kw)
        assert out.shape == (2, sq, 4, dv), out.shape
        grads = kernel.backward(do, q, k, v, out.to(dtype), lse, scale=0.3, **kw)
        assert [g.shape for g in grads] == [q.shape, k.shape, v.shape]
        errs = [rel_err(g, r) for g, r in zip((out, lse, *grads), ref)]
        assert max(errs) <= tol, (name, dqk, dv, kw, errs)


def _fronts():
    fronts = {}
    for layout in ("zigzag", "contiguous", "striped", "doc_zigzag"):
        for strategy in ("ring", "ulysses", "allgather"):
            fronts[(strategy, layout)] = ringattn.SequenceParallel(strategy, layout)
        fronts[("hybrid", layout)] = ringattn.SequenceParallel("hybrid", layout, ulysses_size=2)
    return fronts


def _strategies(rank, world):
    """Every strategy and layout, narrow v (8 against q/k's 16) with packed documents, a
    window, sinks and softcap (math), and wide v (24) causal (sdpa) -> failures."""
    gen = torch.Generator().manual_seed(3)
    seqlen = sum(DOCS)
    cases = [("docs window sinks softcap", 8, DOCS, (4, 0), True, 2.0),
             ("causal, wide v", 24, None, (-1, -1), False, None)]
    failures = []
    for name, dv, docs, window, use_sinks, softcap in cases:
        q, k = _randn(gen, 1, seqlen, 4, 16) * 2, _randn(gen, 1, seqlen, 2, 16)
        v, do = _randn(gen, 1, seqlen, 2, dv), _randn(gen, 1, seqlen, 4, dv)
        sinks = _randn(gen, 4) if use_sinks else None
        ref = reference_attention(q, k, v, do, causal=False, softcap=softcap, sinks=sinks,
                                  mask=dense_mask(docs or [seqlen], window, True))
        cu = None if docs is None else cu_of(docs)
        for (strategy, layout), sp in _fronts().items():
            if layout == "doc_zigzag" and docs is None:
                continue  # it places tokens by document
            idx = _held(sp, layout, seqlen, world, rank, docs)
            ql, kl, vl = (t[:, idx].float().requires_grad_() for t in (q, k, v))
            s32 = None if sinks is None else sinks.float().requires_grad_()
            out, lse = sp.attention(ql, kl, vl, causal=True, cu_seqlens=cu, window_size=window,
                                    sinks=s32, softcap=softcap, return_lse=True)
            out.backward(do[:, idx].float())
            got = [out, lse, ql.grad, kl.grad, vl.grad]
            want = [ref[0][:, idx], ref[1][:, :, idx], *(r[:, idx] for r in ref[2:5])]
            errs = {n: rel_err(g, w) for n, g, w in zip(("out", "lse", "dq", "dk", "dv"), got, want)}
            if s32 is not None:
                dist.all_reduce(s32.grad)  # each rank's rows' share: summed as training does
                errs["dsinks"] = rel_err(s32.grad, ref[5])
            if not max(errs.values()) <= FP32_TOL:
                failures.append((name, strategy, layout, errs))
    # ranks whose v head sizes differ get the same error on every rank, not a hung ring
    q, k = torch.randn(1, 4, 4, 16), torch.randn(1, 4, 2, 16)
    try:
        ringattn.ring_attention(q, k, torch.randn(1, 4, 2, 8 * (rank + 1)), layout="contiguous")
        failures.append("unequal v head sizes across ranks were not refused")
    except ValueError as e:
        if "v_head_dim" not in str(e):
            failures.append(str(e))
    return failures


def test_every_strategy_and_layout_with_value_head_size_unlike_query_key():
    for rank, failures in enumerate(run_distributed(_strategies, 2, timeout=300)):
        assert not failures, f"rank {rank}: {failures[:3]}"


def test_decode_over_a_cache_with_value_head_size_unlike_query_key():
    """decode_attention (one process): new queries over a K/V cache whose v (8) is narrower
    than q/k (16) -> out (b, t, h, 8), against the float64 reference."""
    gen = torch.Generator().manual_seed(5)
    q, k, v, do = _randn(gen, 2, 3, 4, 16), _randn(gen, 2, 7, 2, 16), _randn(gen, 2, 7, 2, 8), \
        _randn(gen, 2, 3, 4, 8)
    ref = reference_attention(q, k, v, do, causal=False, scale=0.25)
    out, lse = ringattn.decode_attention(q.float(), k.float(), v.float(), softmax_scale=0.25,
                                         return_lse=True)
    assert out.shape == (2, 3, 4, 8)
    assert max(rel_err(out, ref[0]), rel_err(lse, ref[1])) <= FP32_TOL
