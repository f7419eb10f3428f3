"""torch's varlen attention (``torch.nn.attention.varlen``) on a CPU stand-in for its CUDA ops.

The rule tests call torch's own ``varlen_attn`` / ``aten::_flash_attention_backward`` on the
stand-in (tests/torch_flash_standin.py) and compare with a float64 attention whose visible keys
are written here from the source's rule, without ringattn's helpers. Then ringattn's
``torch_varlen`` backend over block shapes x windows, and (slow tier) under every strategy and
layout at P = 2.
"""
from __future__ import annotations

import math

import pytest
import torch
from torch.nn.attention.varlen import AuxRequest, varlen_attn

from tests.torch_flash_standin import torch_flash_on_cpu

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _rand(gen, *shape):
    return torch.randn(*shape, generator=gen, dtype=torch.float64)


def _attend(q, k, v, visible, scale):
    """float64 attention of one sequence: q (n, h, d), k/v (m, hk, d), visible bool (n, m) ->
    out (n, h, d) (0 where a row sees nothing), lse (h, n) (-inf there)."""
    g = q.shape[1] // k.shape[1]
    kk, vv = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    s = torch.einsum("qhd,khd->hqk", q, kk) * scale
    s = s.masked_fill(~visible, -math.inf)
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - torch.where(torch.isneginf(lse), 0, lse)[..., None])
    return torch.einsum("hqk,khd->qhd", p, vv), lse


def _cu(lengths):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


def test_window_is_closed_at_max_k_not_at_the_sequence():
    """torch's vendored flash_api.cpp mha_varlen_fwd clamps a side >= max_seqlen_k to -1, and
    set_params_fprop closes a one-sided window's open side at max_seqlen_k (the argument):
    (left, -1) on a sequence of n queries and m keys with max_k = m lets row i see keys
    j <= i + (m - n) + max_k, which hides keys from the first rows when n >= m + 2."""
    gen = torch.Generator().manual_seed(0)
    n, m, left = 9, 4, 2
    q, k, v = _rand(gen, n, 2, 8), _rand(gen, m, 2, 8), _rand(gen, m, 2, 8)
    with torch_flash_on_cpu():
        out, lse = varlen_attn(q, k, v, _cu([n]), _cu([m]), n, m, return_aux=AuxRequest(lse=True),
                               scale=0.5, window_size=(left, -1))
    i, j = torch.arange(n)[:, None], torch.arange(m)[None, :]
    rule = (j >= i + (m - n) - left) & (j <= i + (m - n) + m)
    assert not torch.equal(rule, j >= i + (m - n) - left)  # the closing bites here
    want_out, want_lse = _attend(q, k, v, rule, 0.5)
    seen = rule.any(1)
    torch.testing.assert_close(out[seen], want_out[seen], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse[:, seen], want_lse[:, seen], rtol=1e-12, atol=1e-12)


def test_a_window_side_at_least_max_k_is_unbounded():
    """mha_varlen_fwd: `if (window_size_right >= max_seqlen_k) window_size_right = -1;`; with
    left -1 too, set_params_fprop closes nothing: every key is seen."""
    gen = torch.Generator().manual_seed(1)
    n, m = 8, 3
    q, k, v = _rand(gen, n, 2, 8), _rand(gen, m, 2, 8), _rand(gen, m, 2, 8)
    with torch_flash_on_cpu():
        out, lse = varlen_attn(q, k, v, _cu([n]), _cu([m]), n, m, return_aux=AuxRequest(lse=True),
                               scale=0.5, window_size=(-1, 4))  # 4 >= max_k: unbounded
    want_out, want_lse = _attend(q, k, v, torch.ones(n, m, dtype=torch.bool), 0.5)
    torch.testing.assert_close(out, want_out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse, want_lse, rtol=1e-12, atol=1e-12)


def test_lse_is_heads_by_total_q_and_sequences_are_independent():
    """mha_varlen_fwd: `softmax_lse = at::empty({num_heads, total_q}, kFloat)` (varlen.py's
    _varlen_attn_fake says the same; its docstring's (T_q, H_q) is not what the op returns);
    cu_seq_q / cu_seq_k: sequence s's queries see only its own keys, windows aligned to each
    sequence's own lengths (bottom-right); GQA reads kv head h // (H_q / H_kv)."""
    gen = torch.Generator().manual_seed(2)
    lq, lk = [3, 5, 2], [4, 2, 6]
    q = _rand(gen, sum(lq), 4, 8).float()
    k, v = _rand(gen, sum(lk), 2, 8).float(), _rand(gen, sum(lk), 2, 8).float()
    with torch_flash_on_cpu():
        out, lse = varlen_attn(q, k, v, _cu(lq), _cu(lk), 5, 6, return_aux=AuxRequest(lse=True),
                               window_size=(1, 0), enable_gqa=True)
    assert lse.shape == (4, sum(lq)) and lse.dtype == torch.float32
    cq, ck = _cu(lq).tolist(), _cu(lk).tolist()
    for s in range(3):
        n, m = lq[s], lk[s]
        i, j = torch.arange(n)[:, None] + (m - n), torch.arange(m)[None, :]
        vis = (j >= i - 1) & (j <= i)
        wo, wl = _attend(q[cq[s]:cq[s + 1]].double(), k[ck[s]:ck[s + 1]].double(),
                         v[ck[s]:ck[s + 1]].double(), vis, 8 ** -0.5)
        seen = vis.any(1)
        torch.testing.assert_close(out[cq[s]:cq[s + 1]][seen].double(), wo[seen], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(lse[:, cq[s]:cq[s + 1]][:, seen].double(), wl[:, seen],
                                   rtol=1e-5, atol=1e-5)


def test_rows_without_keys_get_out_zero_and_lse_plus_inf():
    """flash_fwd_kernel.h compute_attn_1rowblock (torch's vendored copy): a row block with no
    key block writes out 0 and lse +INFINITY; softmax.h normalize_softmax_lse likewise for a
    row whose sum is 0. A sequence with no keys, and rows a window hides, both."""
    gen = torch.Generator().manual_seed(3)
    lq, lk = [2, 6], [0, 3]
    q, k, v = _rand(gen, 8, 2, 8), _rand(gen, 3, 2, 8), _rand(gen, 3, 2, 8)
    with torch_flash_on_cpu():
        out, lse = varlen_attn(q, k, v, _cu(lq), _cu(lk), 6, 3, return_aux=AuxRequest(lse=True),
                               window_size=(-1, 0))  # bottom-right causal: rows 0-2 of seq 2 see none
    hidden = torch.tensor([1, 1, 1, 1, 1, 0, 0, 0], dtype=torch.bool)
    assert (out[hidden] == 0).all() and torch.isposinf(lse[:, hidden]).all()
    assert torch.isfinite(lse[:, ~hidden]).all()


def test_v_head_dim_must_equal_q_head_dim():
    """flash_api.cpp mha_varlen_fwd: CHECK_SHAPE(v, total_k, num_heads_k, head_size_og): one
    head size for q, k and v (MLA's v of its own size does not fit this kernel)."""
    q, k, v = torch.randn(4, 2, 16), torch.randn(4, 2, 16), torch.randn(4, 2, 8)
    with torch_flash_on_cpu(), pytest.raises(RuntimeError, match="v must have shape"):
        varlen_attn(q, k, v, _cu([4]), _cu([4]), 4, 4)


def test_backward_reads_the_lse_it_is_given():
    """attention_backward.cu _flash_attention_backward -> mha_varlen_bwd: P = exp(s - lse) with
    the lse passed in (flash_bwd_kernel.h), D = rowsum(dO * O) with the out passed in; so the
    ring can hand it a merged row's (out, lse). Against the float64 gradient of attention with
    that lse; GQA: dk/dv come back with the key's heads, summed over each group."""
    gen = torch.Generator().manual_seed(4)
    n, m = 5, 7
    q, do = _rand(gen, n, 4, 8), _rand(gen, n, 4, 8)
    k, v = _rand(gen, m, 2, 8), _rand(gen, m, 2, 8)
    out, lse = _attend(q, k, v, torch.ones(n, m, dtype=torch.bool), 0.5)
    lse_merged = lse + 0.7  # as if another block had added mass to every row
    out_merged = _rand(gen, n, 4, 8)
    with torch_flash_on_cpu():
        dq, dk, dv = torch.ops.aten._flash_attention_backward(
            do, q, k, v, out_merged, lse_merged, _cu([n]), _cu([m]), n, m, 0.0, False,
            torch.zeros(2, dtype=torch.uint64), torch.empty(0), scale=0.5)
    kk, vv = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    p = torch.exp(torch.einsum("qhd,khd->hqk", q, kk) * 0.5 - lse_merged[..., None])
    dp = torch.einsum("qhd,khd->hqk", do, vv)
    ds = p * (dp - (do * out_merged).sum(-1).T[..., None]) * 0.5
    want_dv = torch.einsum("hqk,qhd->khd", p, do).view(m, 2, 2, 8).sum(2)
    want_dk = torch.einsum("hqk,qhd->khd", ds, q).view(m, 2, 2, 8).sum(2)
    want_dq = torch.einsum("hqk,khd->qhd", ds, kk)
    for got, want in ((dq, want_dq), (dk, want_dk), (dv, want_dv)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_torch_varlen_backend_refuses_without_a_cuda_kernel():
    from ringattn.kernels import BACKENDS, get_backend

    q = torch.randn(1, 4, 2, 16)
    assert "CUDA only" in BACKENDS["torch_varlen"].supports(q)
    with pytest.raises(ValueError, match="torch_varlen"):
        get_backend("torch_varlen", q)
    with torch_flash_on_cpu():
        assert get_backend("torch_varlen", q).name == "torch_varlen"
        with pytest.raises(ValueError, match="softcap"):
            get_backend("torch_varlen", q, softcap=5.0)
        assert "v's head_dim <= 256" in BACKENDS["torch_varlen"].device_problem(q.device, q.dtype, 16, 264)


def test_torch_varlen_backend_pads_mlas_narrower_v_exactly():
    """The aten op takes one head size (test_v_head_dim_must_equal_q_head_dim): the backend pads
    v to q/k's size and slices out and dv back; forward and backward equal math's in float64."""
    from ringattn.kernels import BACKENDS

    gen = torch.Generator().manual_seed(9)
    q, k, v = _rand(gen, 1, 6, 4, 16), _rand(gen, 1, 9, 2, 16), _rand(gen, 1, 9, 2, 8)
    dout = _rand(gen, 1, 6, 4, 8)
    kw = dict(causal=False, scale=0.25, window=(3, 0))
    with torch_flash_on_cpu():
        out, lse = BACKENDS["torch_varlen"].forward(q, k, v, **kw)
        grads = BACKENDS["torch_varlen"].backward(dout, q, k, v, out, lse, **kw)
    want_out, want_lse = BACKENDS["math"].forward(q, k, v, **kw)
    want = BACKENDS["math"].backward(dout, q, k, v, want_out, want_lse, **kw)
    assert out.shape == (1, 6, 4, 8) and [g.shape[-1] for g in grads] == [16, 16, 8]
    torch.testing.assert_close(out, want_out.to(out.dtype), rtol=1e-10, atol=1e-10)
    for got, exp in zip(grads, want):
        torch.testing.assert_close(got, exp.to(got.dtype), rtol=1e-10, atol=1e-10)


def test_torch_varlen_backend_blocks_match_float64():
    """ringattn's torch_varlen backend, every block shape (tall, wide, one row, one key) x
    window and causal, dense (batch 2) and varlen with zero-length sequences, float64, against
    what each block means; backward from the final out/lse (tests/flash_attn_checks.py)."""
    from tests.flash_attn_checks import backend_shape_errors

    errors = backend_shape_errors("torch_varlen")
    bad = {n: e for n, e in errors.items() if not e <= 1e-10}
    assert not bad and len(errors) >= 150, (len(errors), bad)


@pytest.mark.slow
def test_torch_varlen_under_every_strategy_and_layout():
    """backend="torch_varlen" under ring, Ulysses, hybrid and all-gather x contiguous, zigzag,
    striped, doc_zigzag with causal, documents, windows and sinks at P = 2, fp32 vs float64."""
    from tests.distributed import run_distributed
    from tests.flash_attn_checks import backend_matrix

    per_rank = run_distributed(backend_matrix, 2, "torch_varlen", (0, 1, 2, 5, 6, 7), timeout=400)
    failures = [f for r in per_rank for f in r[0]]
    assert not failures, failures[:5]
    blocks = per_rank[0][1]
    for kind in ("full", "causal", "window", "varlen"):
        assert blocks.get(f"torch_varlen/{kind}", 0) > 0, blocks
    assert per_rank[0][2] >= 40, per_rank[0][2]
