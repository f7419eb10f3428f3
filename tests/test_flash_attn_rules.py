"""The CPU stand-in of flash-attn's compiled module obeys flash-attn's source, rule by rule.

Each test calls the stand-in's ``fwd`` / ``varlen_fwd`` / ``bwd`` / ``varlen_bwd`` (the C++
entry points of csrc/flash_attn/flash_api.cpp) for both releases it models (2.6.3, 2.8.3),
without flash-attn's Python package, and compares with a float64 attention whose visible
keys are written here directly from the source's rule (no ringattn helper, no stand-in
helper): the rule quoted in each test is the check. Tolerance: the stand-in computes in
float64 for float64 inputs, so results agree to rounding (1e-12, relative to max(|ref|, 1)).
"""
from __future__ import annotations

import random

import pytest
import torch

from tests.flash_attn_standin import make_module

RELEASES = [(2, 6), (2, 8)]
TOL = 1e-12
INF = float("inf")


@pytest.fixture(params=RELEASES, ids=["2.6.3", "2.8.3"])
def fa(request):
    return make_module(request.param)


def _lse_of(fa, returned):
    return returned[5] if fa.release < (2, 7) else returned[1]


def attention(q, k, v, allowed, scale):
    """float64 attention of one sequence, q (sq, h, d), k/v (sk, hk, d), allowed (sq, sk) ->
    (out, lse) with flash-attn's empty row (out 0, lse +inf); differentiable."""
    h, hk = q.shape[1], k.shape[1]
    k, v = k.repeat_interleave(h // hk, 1), v.repeat_interleave(h // hk, 1)
    s = torch.einsum("qhd,khd->hqk", q, k) * scale
    empty = ~allowed.any(dim=1)  # (sq,)
    s = torch.where(allowed, s, torch.where(empty[:, None], 0.0, -INF))
    p = torch.softmax(s, dim=-1) * (~empty)[:, None]
    lse = torch.logsumexp(s, dim=-1).masked_fill(empty, INF)
    return torch.einsum("hqk,khd->qhd", p, v), lse


def rel(a, b):
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    if not torch.equal(torch.isinf(a), torch.isinf(b)) or (torch.isinf(a) & (a != b)).any():
        return INF
    a, b = a.masked_fill(torch.isinf(a), 0), b.masked_fill(torch.isinf(b), 0)
    # relative to max(|b|, 1): a gradient that is exactly 0 (one visible key) is met to rounding
    return float((a - b).norm() / b.norm().clamp_min(1.0))


def randn(gen, *shape):
    return torch.randn(*shape, generator=gen, dtype=torch.float64)


def dense(fa, sq, sk, causal, window, seed=0, h=4, hk=2, d=8):
    """fwd then bwd (with fwd's out/lse) of batch 2 -> (out, lse, dq, dk, dv, inputs)."""
    gen = torch.Generator().manual_seed(seed)
    q, do = randn(gen, 2, sq, h, d), randn(gen, 2, sq, h, d)
    k, v = randn(gen, 2, sk, hk, d), randn(gen, 2, sk, hk, d)
    r = fa.fwd(q, k, v, None, None, 0.0, d ** -0.5, causal, *window, 0.0, False, None)
    out, lse = r[0], _lse_of(fa, r)
    dq, dk, dv, _ = fa.bwd(do, q, k, v, out, lse, None, None, None, None, 0.0, d ** -0.5, causal,
                           *window, 0.0, False, None, None)
    return out, lse, dq, dk, dv, (q, k, v, do)


def check_dense(fa, sq, sk, causal, window, allowed, seed=0):
    """The stand-in's forward and backward equal float64 attention under ``allowed``."""
    out, lse, dq, dk, dv, (q, k, v, do) = dense(fa, sq, sk, causal, window, seed)
    for b in range(2):
        ql, kl, vl = (t[b].clone().requires_grad_() for t in (q, k, v))
        ref_out, ref_lse = attention(ql, kl, vl, allowed, q.shape[-1] ** -0.5)
        ref_out.backward(do[b])
        got = (out[b], lse[b], dq[b], dk[b], dv[b])
        want = (ref_out, ref_lse, ql.grad, kl.grad, vl.grad)
        errs = [rel(g.detach(), w.detach()) for g, w in zip(got, want)]
        assert max(errs) < TOL, (sq, sk, causal, window, errs)


def band(sq, sk, lo, hi):
    """allowed[i, j] = lo(i) <= j <= hi(i) for the row-dependent bounds lo/hi (callables)."""
    i = torch.arange(sq)[:, None]
    j = torch.arange(sk)[None, :]
    return (j >= lo(i)) & (j <= hi(i))


def test_window_at_least_seqlen_k_is_unbounded(fa):
    """mha_fwd/mha_bwd: `if (window_size_left >= seqlen_k) window_size_left = -1;` (right
    likewise), before anything else: (s_k, -1) on a tall block is full attention, while
    (s_k - 1, -1) is a one-sided window whose open side set_params_fprop closes (next test)."""
    sq, sk = 9, 4
    full = torch.ones(sq, sk, dtype=torch.bool)
    for window in [(sk, -1), (sk + 5, sk), (-1, sk), (sk, sk)]:
        check_dense(fa, sq, sk, False, window, full)
    # a right bound >= s_k is clamped to -1 first, and set_params_fprop then closes the open
    # side at s_k: (1, s_k + 2) on a tall block is (1, s_k), not the band it asked for
    check_dense(fa, sq, sk, False, (1, sk + 2), band(sq, sk, lambda i: i + sk - sq - 1,
                                                     lambda i: i + sk - sq + sk))


@pytest.mark.parametrize("sq,sk,left", [(9, 4, 3), (6, 4, 0), (12, 3, 1), (5, 5, 2), (3, 7, 1)])
def test_one_sided_window_closes_at_seqlen_k(fa, sq, sk, left):
    """set_params_fprop: `if (window_size_left >= 0 && window_size_right < 0)
    window_size_right = seqlen_k;` then mask.h apply_mask_local: key j is visible iff
    i + s_k - s_q - left <= j < i + 1 + s_k - s_q + right. With s_q >= s_k + 2 the first
    rows lose keys: row i sees at most j <= i + 2 s_k - s_q."""
    allowed = band(sq, sk, lambda i: i + sk - sq - left, lambda i: i + sk - sq + sk)
    check_dense(fa, sq, sk, False, (left, -1), allowed)
    if sq >= sk + 2:
        assert not allowed[0].all(), "the case must hide keys from the first row"


def test_left_open_window_closes_at_seqlen_k(fa):
    """set_params_fprop: `if (window_size_left < 0 && window_size_right >= 0)
    window_size_left = seqlen_k;`: row i sees j >= i + s_k - s_q - s_k = i - s_q, never
    negative for a real row, so (-1, R) keeps every earlier key."""
    sq, sk, right = 4, 9, 1
    check_dense(fa, sq, sk, False, (-1, right),
                band(sq, sk, lambda i: i - sq, lambda i: i + sk - sq + right))


@pytest.mark.parametrize("sq,sk", [(7, 4), (4, 7), (5, 5), (9, 1)])
@pytest.mark.parametrize("left", [-1, 2])
def test_causal_is_right_zero_bottom_right(fa, sq, sk, left):
    """mha_fwd: `if (is_causal) window_size_right = 0;` and mask.h's bound
    j < i + 1 + s_k - s_q + 0: row i sees keys j <= i + s_k - s_q (bottom-right aligned);
    rows of a tall block above that see nothing (out 0, lse +inf)."""
    lo = (lambda i: i - sq - sk) if left < 0 else (lambda i: i + sk - sq - left)
    check_dense(fa, sq, sk, True, (left, -1), band(sq, sk, lo, lambda i: i + sk - sq))


@pytest.mark.parametrize("window", [(-1, -1), (2, -1), (0, 0)])
def test_one_query_row_turns_causal_off(fa, window):
    """mha_fwd: `if (seqlen_q == 1 && !alibi_slopes_.has_value()) is_causal = false;`
    (mha_varlen_fwd: max_seqlen_q == 1). One row bottom-right aligned sees every key under
    causal anyway, so causal and not are the same; a top-left reading would see key 0 only."""
    sk = 6
    left, right = window
    lo = (lambda i: i - 1 - sk) if left < 0 else (lambda i: i + sk - 1 - left)
    hi_right = sk if right < 0 else right  # set_params_fprop closes (L, -1) at seqlen_k
    for causal in (False, True):
        check_dense(fa, 1, sk, causal, window, band(1, sk, lo, lambda i: i + sk - 1 + hi_right))


def test_rows_without_keys_out_zero_lse_inf_and_no_probability_in_backward(fa):
    """softmax.h: a row whose sum is 0 gets lse = INFINITY and out 0; flash_bwd_kernel.h
    computes P = exp2(s * scale_log2 - lse * log2e) through scale_apply_exp2<Scale_max=false>,
    whose `max == -INFINITY ? 0` means: lse +inf -> P = 0, lse -inf -> P = exp(s)."""
    sq, sk = 6, 2
    out, lse, dq, dk, dv, (q, k, v, do) = dense(fa, sq, sk, True, (-1, -1))
    hidden = sq - sk  # rows i < s_q - s_k see no key under bottom-right causal
    assert (out[:, :hidden] == 0).all() and torch.isposinf(lse[:, :, :hidden]).all()
    assert torch.isfinite(lse[:, :, hidden:]).all() and (dq[:, :hidden] == 0).all()
    # backward with lse +inf on a row that does see keys: that row contributes nothing
    scale = q.shape[-1] ** -0.5
    args = (None, None, None, None, 0.0, scale, False, -1, -1, 0.0, False, None, None)
    full = fa.fwd(q, k, v, None, None, 0.0, scale, False, -1, -1, 0.0, False, None)
    full_out, full_lse = full[0], _lse_of(fa, full)
    lse_inf = full_lse.clone()
    lse_inf[:, :, 0] = INF
    dq1, dk1, dv1, _ = fa.bwd(do, q, k, v, full_out, lse_inf, *args)
    do0 = do.clone()
    do0[:, 0] = 0
    dq0, dk0, dv0, _ = fa.bwd(do0, q, k, v, full_out, full_lse, *args)
    assert (dq1[:, 0] == 0).all()
    assert rel(dv1, dv0) < TOL and rel(dk1, dk0) < TOL
    # lse -inf: P = exp(s) unnormalised; dv = P^T dO, summed over the query-head group
    lse_neg = torch.full_like(full_lse, -INF)
    _, _, dv2, _ = fa.bwd(do, q, k, v, full_out, lse_neg, *args)
    kk = k.repeat_interleave(2, 2)
    p = torch.exp(torch.einsum("bqhd,bkhd->bhqk", q, kk) * scale)
    want = torch.einsum("bhqk,bqhd->bkhd", p, do).view(2, sk, 2, 2, -1).sum(3)
    assert rel(dv2, want) < TOL


def varlen(fa, cu_q, cu_k, causal, window, max_q=None, max_k=None, h=4, hk=2, d=8, seed=0):
    """varlen_fwd then varlen_bwd -> (out, lse, dq, dk, dv, softmax_d, inputs)."""
    gen = torch.Generator().manual_seed(seed)
    q, do = randn(gen, cu_q[-1], h, d), randn(gen, cu_q[-1], h, d)
    k, v = randn(gen, cu_k[-1], hk, d), randn(gen, cu_k[-1], hk, d)
    lens_q = [b - a for a, b in zip(cu_q, cu_q[1:])]
    lens_k = [b - a for a, b in zip(cu_k, cu_k[1:])]
    max_q = max(lens_q) if max_q is None else max_q
    max_k = max(lens_k) if max_k is None else max_k
    cq, ck = (torch.tensor(c, dtype=torch.int32) for c in (cu_q, cu_k))
    r = fa.varlen_fwd(q, k, v, None, cq, ck, None, None, None, None, max_q, max_k, 0.0, d ** -0.5,
                      False, causal, *window, 0.0, False, None)
    out, lse = r[0], _lse_of(fa, r)
    grads = fa.varlen_bwd(do, q, k, v, out, lse, None, None, None, cq, ck, None, max_q, max_k, 0.0,
                          d ** -0.5, False, causal, *window, 0.0, False, None, None)
    return (out, lse, *grads, (q, k, v, do))


def check_varlen(fa, cu_q, cu_k, causal, window, rule, max_k=None, seed=0):
    """Each sequence s against float64 attention under ``rule(sq, sk)`` -> allowed."""
    out, lse, dq, dk, dv, softmax_d, (q, k, v, do) = varlen(fa, cu_q, cu_k, causal, window,
                                                            max_k=max_k, seed=seed)
    assert lse.shape == (q.shape[1], cu_q[-1]) and lse.dtype == torch.float64
    ref_dk, ref_dv = torch.zeros_like(k), torch.zeros_like(v)
    for s in range(len(cu_q) - 1):
        rq, rk = slice(cu_q[s], cu_q[s + 1]), slice(cu_k[s], cu_k[s + 1])
        ql, kl, vl = (t.clone().requires_grad_() for t in (q[rq], k[rk], v[rk]))
        ref_out, ref_lse = attention(ql, kl, vl, rule(ql.shape[0], kl.shape[0]), q.shape[-1] ** -0.5)
        if ql.shape[0] and kl.shape[0]:
            ref_out.backward(do[rq])
            assert rel(dq[rq], ql.grad) < TOL, s
            ref_dk[rk], ref_dv[rk] = kl.grad, vl.grad
        elif ql.shape[0]:
            assert (dq[rq] == 0).all(), s
        assert rel(out[rq], ref_out.detach()) < TOL and rel(lse[:, rq], ref_lse.detach()) < TOL, s
        # softmax_d (h, total_q + 128 b): sequence s's D = rowsum(dO * O) at cu_q[s] + 128 s
        d_ref = (do[rq] * out[rq]).sum(-1).T
        assert rel(softmax_d[:, cu_q[s] + 128 * s:cu_q[s + 1] + 128 * s], d_ref) < 1e-6, s
    assert rel(dk, ref_dk) < TOL and rel(dv, ref_dv) < TOL


def test_varlen_one_sided_window_closes_at_max_seqlen_k(fa):
    """mha_varlen_fwd passes max_seqlen_k to set_params_fprop as seqlen_k: (L, -1) gets
    right = max_seqlen_k, and mask.h aligns each sequence by its own lengths:
    j <= i + s_k - s_q + max_seqlen_k. A tall sequence next to a long one keeps more keys."""
    left = 1
    rule = lambda mk: lambda sq, sk: band(sq, sk, lambda i: i + sk - sq - left,  # noqa: E731
                                          lambda i: i + sk - sq + mk)
    check_varlen(fa, [0, 9, 11], [0, 2, 4], False, (left, -1), rule(2))  # hides: 9 rows, 2 keys
    check_varlen(fa, [0, 9, 11], [0, 2, 8], False, (left, -1), rule(6))  # max_seqlen_k = 6
    check_varlen(fa, [0, 9, 11], [0, 2, 4], False, (left, -1), rule(5), max_k=5)
    # the clamp uses max_seqlen_k too: left >= max_seqlen_k -> -1, then (-1, -1) is full
    check_varlen(fa, [0, 9, 11], [0, 2, 4], False, (2, -1),
                 lambda sq, sk: torch.ones(sq, sk, dtype=torch.bool))


def test_varlen_zero_length_sequences(fa):
    """seqlen_q == 0: flash_fwd_kernel.h returns (`m_block * kBlockM >= actual_seqlen_q`):
    nothing to write; its keys get dk = dv = 0 (flash_bwd_kernel.h: m_block < m_block_min
    writes zeros). seqlen_k == 0: the early exit writes out 0, lse INFINITY ("This also
    covers the case where actual_seqlen_k == 0"), and its rows get dq = 0."""
    rule = lambda sq, sk: torch.ones(sq, sk, dtype=torch.bool).tril(sk - sq)  # noqa: E731
    cu_q, cu_k = [0, 3, 3, 7, 10, 10], [0, 4, 9, 9, 12, 14]  # seq 1: no rows; seq 2: no keys
    check_varlen(fa, cu_q, cu_k, True, (-1, -1), rule)
    out, lse, dq, dk, dv, *_ = varlen(fa, cu_q, cu_k, True, (-1, -1))
    assert (out[3:7] == 0).all() and torch.isposinf(lse[:, 3:7]).all() and (dq[3:7] == 0).all()
    assert (dk[4:9] == 0).all() and (dv[4:9] == 0).all() and (dk[12:] == 0).all()


def test_varlen_without_keys_at_all(fa):
    """mha_varlen_fwd: `if (max_seqlen_k > 0) run_mha_fwd(...) else { out.zero_();
    softmax_lse.fill_(INFINITY); }`."""
    out, lse, *_ = varlen(fa, [0, 2, 5], [0, 0, 0], False, (-1, -1))
    assert (out == 0).all() and torch.isposinf(lse).all()


def test_varlen_one_query_row_with_gqa_and_an_empty_sequence_is_refused(fa):
    """mha_varlen_fwd's seqlenq_ngroups_swapped (max_seqlen_q == 1, GQA, no window) reshapes q
    to (batch, h_k, groups, d): a sequence without rows leaves total_q short of the batch and
    the reshape fails. With a window (no swap) the same call runs."""
    with pytest.raises(RuntimeError, match="invalid for input of size"):
        varlen(fa, [0, 1, 1, 2], [0, 3, 5, 8], False, (-1, -1))
    varlen(fa, [0, 1, 1, 2], [0, 3, 5, 8], False, (1, 1))
    varlen(fa, [0, 1, 2, 3], [0, 3, 5, 8], False, (-1, -1))


def test_lse_and_softmax_d_layouts(fa):
    """mha_fwd: softmax_lse torch::empty({batch_size, num_heads, seqlen_q}, kFloat); mha_bwd:
    softmax_d {batch_size, num_heads, round_multiple(seqlen_q, 128)}; varlen: lse
    {num_heads, total_q}, softmax_d {num_heads, total_q + 128 * batch_size}. fp32 for 16-
    and 32-bit inputs (the stand-in keeps fp64 for fp64 inputs)."""
    q, k = torch.randn(2, 5, 4, 8), torch.randn(2, 3, 2, 8)
    r = fa.fwd(q, k, k, None, None, 0.0, 0.3, False, -1, -1, 0.0, False, None)
    lse = _lse_of(fa, r)
    assert lse.shape == (2, 4, 5) and lse.dtype == torch.float32
    d = fa.bwd(q, q, k, k, r[0], lse, None, None, None, None, 0.0, 0.3, False, -1, -1, 0.0, False,
               None, None)[3]
    assert d.shape == (2, 4, 128) and d.dtype == torch.float32
    cu = torch.tensor([0, 2, 5], dtype=torch.int32)
    r = fa.varlen_fwd(q[0], k[0], k[0], None, cu, torch.tensor([0, 1, 3], dtype=torch.int32), None,
                      None, None, None, 3, 2, 0.0, 0.3, False, False, -1, -1, 0.0, False, None)
    assert _lse_of(fa, r).shape == (4, 5) and _lse_of(fa, r).dtype == torch.float32


def test_torch_checks(fa):
    """flash_api.cpp's TORCH_CHECKs on dtypes, strides and shapes (message fragments quoted)."""
    q, k = torch.randn(1, 4, 4, 8), torch.randn(1, 4, 2, 8)
    args = (None, 0.0, 0.3, False, -1, -1, 0.0, False, None)

    def refused(match, q=q, k=k, v=k, out_=None, args=args):
        with pytest.raises(RuntimeError, match=match):
            fa.fwd(q, k, v, out_, *args)

    refused("query and key must have the same dtype", k=k.double())
    refused("contiguous last dimension", q=torch.randn(1, 4, 4, 16)[..., ::2])
    refused("must divide number of heads", k=torch.randn(1, 4, 3, 8), v=torch.randn(1, 4, 3, 8))
    refused("at most 256", q=torch.randn(1, 4, 2, 264), k=torch.randn(1, 4, 2, 264),
            v=torch.randn(1, 4, 2, 264))
    refused("v must have shape", v=torch.randn(1, 5, 2, 8))
    refused("out must have shape", out_=torch.empty(1, 4, 4, 16))
    refused("batch size must be positive", q=q[:0], k=k[:0], v=k[:0])
    refused("return_softmax is only supported when p_dropout > 0.0",
            args=(None, 0.0, 0.3, False, -1, -1, 0.0, True, None))
    if fa.release >= (2, 7):  # 2.6.3's C++ pads the head size itself
        refused("multiple of 8", q=q[..., :6], k=k[..., :6], v=k[..., :6])
    with pytest.raises(RuntimeError, match="dq must have the same dtype"):
        fa.bwd(q, q, k, k, q, torch.zeros(1, 4, 4), q.double(), None, None, None, 0.0, 0.3, False,
               -1, -1, 0.0, False, None, None)
    with pytest.raises(RuntimeError, match="cu_seqlens_q must have dtype int32"):
        fa.varlen_fwd(q[0], k[0], k[0], None, torch.tensor([0, 4]), torch.tensor([0, 4]), None,
                      None, None, None, 4, 4, 0.0, 0.3, False, False, -1, -1, 0.0, False, None)


def flash_rule(sq, sk, causal, left, right, seqlen_k=None):
    """What flash_api.cpp + mask.h do to a dense (or, with seqlen_k = max_seqlen_k, varlen)
    call, written out as one chain: clamp, s_q == 1, causal, set_params_fprop, mask.h."""
    seqlen_k = sk if seqlen_k is None else seqlen_k
    left, right = (-1 if left >= seqlen_k else left), (-1 if right >= seqlen_k else right)
    causal = causal and sq != 1
    right = 0 if causal else right
    if left < 0 and right < 0:
        return torch.ones(sq, sk, dtype=torch.bool)
    lo = (lambda i: i - sq - seqlen_k) if left < 0 else (lambda i: i + sk - sq - left)
    return band(sq, sk, lo, lambda i: i + sk - sq + (seqlen_k if right < 0 else right))


def test_random_block_shapes_against_the_rule(fa):
    """Tall, wide, one-row and one-key blocks with random windows and causality, dense and
    varlen (with zero-length sequences), against ``flash_rule`` in float64."""
    rng = random.Random(0)
    shapes = [(1, 1), (1, 7), (7, 1), (2, 9), (9, 2), (12, 3), (5, 5), (3, 11)]
    for n in range(40):
        sq, sk = shapes[n % len(shapes)] if n < len(shapes) else (rng.randint(1, 12), rng.randint(1, 12))
        causal = rng.random() < 0.3
        window = (rng.choice([-1, 0, 1, 3, 8, 20]), rng.choice([-1, 0, 2, 5, 20]))
        check_dense(fa, sq, sk, causal, window, flash_rule(sq, sk, causal, *window), seed=n)
    for n in range(12):
        lens = [(rng.choice([0, 1, 2, 5, 9]), rng.choice([0, 1, 3, 6])) for _ in range(rng.randint(1, 4))]
        cu_q = [0] + [sum(a for a, _ in lens[:i + 1]) for i in range(len(lens))]
        cu_k = [0] + [sum(b for _, b in lens[:i + 1]) for i in range(len(lens))]
        if cu_q[-1] == 0 or max(b for _, b in lens) == 0:
            continue
        causal = rng.random() < 0.3
        window = (rng.choice([-1, 0, 2, 7]), rng.choice([-1, 0, 1, 7]))
        max_k = max(b for _, b in lens)
        max_q = max(a for a, _ in lens)
        if max_q == 1 and window[0] < 0 and window[1] < 0:
            window = (0, -1)  # one row per sequence and GQA, no window: the swapped-q test
        check_varlen(fa, cu_q, cu_k, causal, window,
                     lambda a, b: flash_rule(a, b, causal and max_q != 1, *window, seqlen_k=max_k),
                     seed=n)


def test_value_head_size_must_equal_the_query_head_size(fa):
    """flash_api.cpp takes one head size: mha_fwd / mha_bwd CHECK_SHAPE(v, batch_size,
    seqlen_k, num_heads_k, head_size) and mha_varlen_fwd / mha_varlen_bwd CHECK_SHAPE(v,
    total_k, num_heads_k, head_size), head_size read from q (2.6.3's mha_fwd: head_size_og).
    So MLA's narrower v (DeepSeek-V3: 128 against 192) cannot be passed as is; ringattn's
    flash backend pads it (kernels/base.py pad_head_dims). The same call with v padded runs."""
    q, k = torch.randn(1, 4, 4, 16), torch.randn(1, 4, 2, 16)
    v = torch.randn(1, 4, 2, 8)
    lse = torch.zeros(1, 4, 4)
    dense = (None, 0.0, 0.3, False, -1, -1, 0.0, False, None)
    with pytest.raises(RuntimeError, match="v must have shape"):
        fa.fwd(q, k, v, None, *dense)
    fa.fwd(q, k, torch.nn.functional.pad(v, (0, 8)), None, *dense)
    with pytest.raises(RuntimeError, match="v must have shape"):
        fa.bwd(q, q, k, v, q, lse, None, None, None, None, 0.0, 0.3, False, -1, -1, 0.0, False,
               None, None)
    cu = torch.tensor([0, 4], dtype=torch.int32)
    with pytest.raises(RuntimeError, match="v must have shape"):
        fa.varlen_fwd(q[0], k[0], v[0], None, cu, cu, None, None, None, None, 4, 4, 0.0, 0.3,
                      False, False, -1, -1, 0.0, False, None)
    with pytest.raises(RuntimeError, match="v must have shape"):
        fa.varlen_bwd(q[0], q[0], k[0], v[0], q[0], lse[0], None, None, None, cu, cu, None, 4, 4,
                      0.0, 0.3, False, False, -1, -1, 0.0, False, None, None)
