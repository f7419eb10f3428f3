"""FlashAttention-3's interface on a CPU stand-in (tests/fa3_standin.py) and ringattn's ``fa3``
backend on it. The rule tests call the stand-in's entry points and compare with a float64
attention whose visible keys are written here from hopper/flash_api.cpp and hopper/mask.h,
without ringattn's helpers."""
from __future__ import annotations

import math

import pytest
import torch

from tests.fa3_standin import fa3_on_cpu, load_fa3


def _rand(gen, *shape):
    return torch.randn(*shape, generator=gen, dtype=torch.float64)


def _cu(lengths):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


def _attend(q, k, v, visible, scale, softcap=None):
    """float64 attention of one sequence (GQA by repeat) -> out (n, h, dv), lse (h, n)."""
    g = q.shape[1] // k.shape[1]
    s = torch.einsum("qhd,khd->hqk", q, k.repeat_interleave(g, 1)) * scale
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    s = s.masked_fill(~visible, -math.inf)
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - torch.where(torch.isneginf(lse), 0, lse)[..., None])
    return torch.einsum("hqk,khd->qhd", p, v.repeat_interleave(g, 1)), lse


def _fwd(fa3, q, k, v, lq, lk, **kw):
    out, lse, *_ = fa3._flash_attn_forward(q, k, v, cu_seqlens_q=_cu(lq), cu_seqlens_k=_cu(lk),
                                           max_seqlen_q=max(lq), max_seqlen_k=max(lk), **kw)
    return out, lse


def test_one_sided_window_is_exact_on_a_tall_sequence():
    """hopper/flash_api.cpp mha_fwd + set_params_fprop: an open side becomes max_seqlen_k - 1
    (left) or max_seqlen_q - 1 (right), unlike flash-attn 2's seqlen_k; hopper/mask.h aligns
    the band bottom-right on the actual lengths: (left, -1) on 9 queries x 4 keys hides no key
    beyond the band (flash-attn 2 would close the right side at 4 and hide keys from row 0)."""
    gen = torch.Generator().manual_seed(0)
    n, m, left = 9, 4, 2
    q, k, v = _rand(gen, n, 2, 8), _rand(gen, m, 2, 8), _rand(gen, m, 2, 8)
    with fa3_on_cpu():
        out, lse = _fwd(load_fa3(), q, k, v, [n], [m], softmax_scale=0.5, window_size_left=left)
    i, j = torch.arange(n)[:, None] + (m - n), torch.arange(m)[None, :]
    rule = j >= i - left
    want_out, want_lse = _attend(q, k, v, rule, 0.5)
    seen = rule.any(1)
    torch.testing.assert_close(out[seen], want_out[seen], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse[:, seen], want_lse[:, seen], rtol=1e-12, atol=1e-12)


def test_empty_rows_lse_minus_inf_and_no_keys_plus_inf():
    """hopper/epilogue_fwd.hpp store_zero ("Write 0 to output and -inf to LSE") and softmax.h
    (`sum == 0 -> -INFINITY`): a row that sees no key gets out 0, lse -inf (flash-attn 2 writes
    +inf); mha_fwd with max_seqlen_k == 0: out 0, lse +inf. lse is (heads, total_q)."""
    gen = torch.Generator().manual_seed(1)
    q, k = _rand(gen, 6, 2, 8), _rand(gen, 3, 2, 8)
    with fa3_on_cpu():
        fa3 = load_fa3()
        out, lse = _fwd(fa3, q, k, k, [6], [3], causal=True)  # bottom-right: rows 0-2 see none
        assert lse.shape == (2, 6)
        assert (out[:3] == 0).all() and torch.isneginf(lse[:, :3]).all() and torch.isfinite(lse[:, 3:]).all()
        out, lse = _fwd(fa3, q, k[:0], k[:0], [6], [0])
        assert (out == 0).all() and torch.isposinf(lse).all()


def test_v_head_dim_rule_and_gqa_softcap_against_float64():
    """hopper/flash_api.cpp mha_fwd: V head dim of its own for Q/K (128, 192] with V (96, 128]
    (192/128 runs; 128/64 is refused); GQA reads kv head h // g; softcap c * tanh(s / c)."""
    gen = torch.Generator().manual_seed(2)
    q, k, v = _rand(gen, 5, 4, 192), _rand(gen, 7, 2, 192), _rand(gen, 7, 2, 128)
    with fa3_on_cpu():
        fa3 = load_fa3()
        out, lse = _fwd(fa3, q, k, v, [5], [7], softmax_scale=0.1, softcap=3.0)
        want_out, want_lse = _attend(q, k, v, torch.ones(5, 7, dtype=torch.bool), 0.1, 3.0)
        torch.testing.assert_close(out, want_out, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(lse, want_lse, rtol=1e-12, atol=1e-12)
        with pytest.raises(RuntimeError, match="V headdim"):
            _fwd(fa3, q[..., :128], k[..., :128], v[..., :64], [5], [7])


def test_backward_reads_the_lse_it_is_given():
    """hopper/flash_bwd_preprocess_kernel.h / mainloop_bwd: P = exp(S - LSE) with the LSE passed
    in, D = rowsum(dO * O) with the out passed in; dq/dk/dv written into the given buffers, dk/dv
    summed over each GQA group."""
    gen = torch.Generator().manual_seed(3)
    n, m = 5, 7
    q, do, out = _rand(gen, n, 4, 16), _rand(gen, n, 4, 16), _rand(gen, n, 4, 16)
    k, v = _rand(gen, m, 2, 16), _rand(gen, m, 2, 16)
    lse = _attend(q, k, v, torch.ones(n, m, dtype=torch.bool), 0.25)[1] + 0.5
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    with fa3_on_cpu():
        load_fa3()._flash_attn_backward(do, q, k, v, out, lse, _cu([n]), _cu([m]), None, None, n, m,
                                        dq, dk, dv, softmax_scale=0.25)
    kk, vv = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    p = torch.exp(torch.einsum("qhd,khd->hqk", q, kk) * 0.25 - lse[..., None])
    ds = p * (torch.einsum("qhd,khd->hqk", do, vv) - (do * out).sum(-1).T[..., None]) * 0.25
    torch.testing.assert_close(dv, torch.einsum("hqk,qhd->khd", p, do).view(m, 2, 2, 16).sum(2))
    torch.testing.assert_close(dk, torch.einsum("hqk,qhd->khd", ds, q).view(m, 2, 2, 16).sum(2))
    torch.testing.assert_close(dq, torch.einsum("hqk,khd->qhd", ds, kk))


def test_fa3_backend_needs_the_module_and_hopper():
    from ringattn.kernels import BACKENDS, get_backend

    q = torch.randn(1, 4, 2, 16)
    assert "CUDA only" in BACKENDS["fa3"].supports(q)
    with fa3_on_cpu():
        assert get_backend("fa3", q, softcap=2.0).name == "fa3"
        assert BACKENDS["fa3"].device_problem(q.device, q.dtype, 192, 128) is None
        assert "V head dim" in BACKENDS["fa3"].device_problem(q.device, q.dtype, 128, 64)
    assert "CUDA only" in BACKENDS["fa3"].supports(q)  # the stand-in is gone again


@pytest.mark.slow
def test_fa3_backend_block_shapes_match_float64():
    """ringattn's fa3 backend over block shapes x windows and causal, dense and varlen with
    zero-length sequences, float64, against what each block means."""
    from tests.flash_attn_checks import backend_shape_errors

    errors = backend_shape_errors("fa3")
    bad = {n: e for n, e in errors.items() if not e <= 1e-10}
    assert not bad and len(errors) >= 150, (len(errors), bad)


def test_fa3_backend_mla_block_with_softcap_matches_float64():
    """An MLA-shaped block (q/k 192, v 128), top-left causal with more rows than keys, with
    softcap, forward and backward from the final out/lse, float64."""
    from ringattn.kernels import BACKENDS
    from tests.reference import reference_attention, rel_err

    gen = torch.Generator().manual_seed(4)
    q, do = _rand(gen, 2, 9, 4, 192), _rand(gen, 2, 9, 4, 128)
    k, v = _rand(gen, 2, 6, 2, 192), _rand(gen, 2, 6, 2, 128)
    mask = torch.ones(9, 6, dtype=torch.bool).tril()  # top-left causal, more rows than keys
    ref = reference_attention(q, k, v, do, causal=False, mask=mask, softcap=4.0)
    with fa3_on_cpu():
        fb = BACKENDS["fa3"]
        kw = dict(causal=True, scale=192 ** -0.5, softcap=4.0)
        out, lse = fb.forward(q, k, v, **kw)
        grads = fb.backward(do, q, k, v, ref[0], ref[1], **kw)
    assert max(rel_err(g, r) for g, r in zip((out, lse, *grads), ref)) <= 1e-10


@pytest.mark.slow
def test_fa3_under_every_strategy_and_layout():
    """backend="fa3" under ring, Ulysses, hybrid and all-gather x every layout with causal,
    documents, windows, sinks and softcap at P = 2, fp32 vs float64."""
    from tests.distributed import run_distributed
    from tests.flash_attn_checks import backend_matrix

    per_rank = run_distributed(backend_matrix, 2, "fa3", None, timeout=400)
    failures = [f for r in per_rank for f in r[0]]
    assert not failures, failures[:5]
    blocks = per_rank[0][1]
    for kind in ("full", "causal", "window", "varlen"):
        assert blocks.get(f"fa3/{kind}", 0) > 0, blocks
    assert per_rank[0][2] >= 50, per_rank[0][2]
