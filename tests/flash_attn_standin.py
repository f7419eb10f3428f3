"""A CPU stand-in for flash-attn's compiled module, so that flash-attn's own Python package
(installed without its CUDA build) runs unchanged on CPU tensors.

    from tests.flash_attn_standin import load_flash_attn
    fa = load_flash_attn()   # flash_attn.flash_attn_interface, on the stand-in

``fwd``, ``bwd``, ``varlen_fwd``, ``varlen_bwd`` take the argument lists of mha_fwd, mha_bwd,
mha_varlen_fwd and mha_varlen_bwd in flash-attn's csrc/flash_attn/flash_api.cpp and return
what they return for the installed release:
    2.6.3: fwd/varlen_fwd -> (out, q_padded, k_padded, v_padded, out_padded, lse, p, rng_state)
    2.8.3: fwd/varlen_fwd -> (out, lse, p, rng_state)   (head padding moved to Python in 2.7)
    both:  bwd/varlen_bwd -> (dq, dk, dv, softmax_d), dq/dk/dv written into the given buffers.

Every convention below names the source it mirrors. They were read at the tags v2.6.3 and
v2.8.3; where the two differ the function says so, otherwise the code is the same in both
(mask.h, softmax.h, block_info.h and the kernels' masking differ only in namespaces).
Deviations, on purpose: any float dtype and the CPU (the C++ takes fp16/bf16 on CUDA);
math in fp32, fp64 for fp64 inputs (lse too, so float64 checks are exact); no dropout,
ALiBi, paged KV, seqused_k or leftpad_k (refused); memory the C++ leaves unwritten
(torch::empty) reads NaN here; a varlen sequence longer than max_seqlen_q/k, which the CUDA
grid would cover only in part, is refused; a dense call with seqlen_k == 0 (no special case
in mha_fwd: what the kernel does depends on tile evenness) is refused. seqlenq_ngroups_swapped
(mha_fwd / mha_varlen_fwd with one query row and GQA: a reshape, same attention) is modelled
only where it fails: varlen whose total_q differs from the batch size.

flash-attn >= 2.7 on torch >= 2.4 registers its kernels as ``torch.library`` custom ops for
CUDA only; ``load_flash_attn`` registers the same functions for CPU (``register_kernel``),
so its wrappers (flash_attn_func, flash_attn_varlen_func, the autograd Functions,
_flash_attn_backward, ...) reach this module through their own code.
"""
from __future__ import annotations

import importlib
import importlib.metadata
import sys
import types

import torch

MODULE = "flash_attn_2_cuda"  # what flash_attn_interface imports (2.6 and 2.8 alike)
_OPS = ("_flash_attn_forward", "_flash_attn_varlen_forward", "_flash_attn_backward",
        "_flash_attn_varlen_backward")
_NAN = float("nan")


def _release() -> tuple[int, int]:
    major, minor = importlib.metadata.version("flash_attn").split(".")[:2]
    return int(major), int(minor)


def _check(cond, msg):
    if not cond:
        raise RuntimeError(msg)  # TORCH_CHECK raises RuntimeError


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


# --- window sizes: flash_api.cpp, each entry point in its own order --------------------------

def fwd_window(seqlen_q, seqlen_k, is_causal, left, right):
    """mha_fwd: the clamp `window >= seqlen_k -> -1` first, then `seqlen_q == 1 -> is_causal =
    false` (no ALiBi here), then `is_causal -> window_size_right = 0`. -> (left, right)."""
    left = -1 if left >= seqlen_k else left
    right = -1 if right >= seqlen_k else right
    if seqlen_q == 1:
        is_causal = False
    return left, 0 if is_causal else right


def varlen_fwd_window(max_seqlen_q, max_seqlen_k, is_causal, left, right):
    """mha_varlen_fwd: `max_seqlen_q == 1 -> is_causal = false`, `is_causal -> right = 0`, and
    only then the clamp, against max_seqlen_k (not each sequence's length). -> (left, right)."""
    if max_seqlen_q == 1:
        is_causal = False
    right = 0 if is_causal else right
    return (-1 if left >= max_seqlen_k else left), (-1 if right >= max_seqlen_k else right)


def bwd_window(seqlen_k, is_causal, left, right):
    """mha_bwd / mha_varlen_bwd (seqlen_k: max_seqlen_k): `is_causal -> right = 0` first, then
    the clamp; there is no seqlen_q == 1 rule in backward. -> (left, right)."""
    right = 0 if is_causal else right
    return (-1 if left >= seqlen_k else left), (-1 if right >= seqlen_k else right)


def set_params(left, right, seqlen_k):
    """set_params_fprop (set_params_dgrad calls it), seqlen_k being max_seqlen_k under varlen:
    `is_causal = left < 0 && right == 0`; a one-sided window's open side becomes seqlen_k
    (`if (left >= 0 && right < 0) right = seqlen_k;` and left likewise). Is_local is
    run_mha_fwd/bwd's LOCAL_SWITCH: `(left >= 0 || right >= 0) && !is_causal`.
    -> (is_causal, is_local, left, right) as the kernel receives them."""
    is_causal = left < 0 and right == 0
    if left < 0 and right >= 0:
        left = seqlen_k
    if left >= 0 and right < 0:
        right = seqlen_k
    return is_causal, (left >= 0 or right >= 0) and not is_causal, left, right


def visible(s_q, s_k, params, device=None):
    """bool (s_q, s_k), the sequence's actual lengths (block_info.h actual_seqlen_q/k): mask.h
    Mask::apply_mask. Causal (apply_mask_causal = apply_mask_local without the left bound,
    right 0) and local (apply_mask_local): row i sees key j iff
    j < min(s_k, i + 1 + s_k - s_q + right) and, local only, j >= max(0, i + s_k - s_q - left).
    Neither: every key (apply_mask only cuts columns >= s_k)."""
    is_causal, is_local, left, right = params
    i = torch.arange(s_q, device=device)[:, None]
    j = torch.arange(s_k, device=device)[None, :]
    ok = torch.ones(s_q, s_k, dtype=torch.bool, device=device)
    if is_causal or is_local:
        ok &= j < i + 1 + s_k - s_q + (0 if is_causal else right)
    if is_local:
        ok &= j >= i + s_k - s_q - left
    return ok


# --- one sequence: flash_fwd_kernel.h, flash_bwd_kernel.h, softmax.h --------------------------

def _scores(q, k, scale, softcap, vis):
    """q (sq, h, d), k (sk, hk, d) -> scores (hk, g, sq, sk), masked to -inf. Softcap: set_params
    sets params.softcap = scale / softcap and scale_softmax = softcap, so the kernel's score is
    softcap * tanh(scale * q.k / softcap) (utils.h apply_softcap); GQA reads K/V head h // g."""
    sq, h, d = q.shape
    hk = k.shape[1]
    acc = _acc(q.dtype)
    s = torch.einsum("qhgd,khd->hgqk", q.to(acc).view(sq, hk, h // hk, d), k.to(acc)) * scale
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    return s.masked_fill(~vis, float("-inf"))


def forward_sequence(q, k, v, scale, softcap, vis):
    """One sequence -> out (sq, h, d) in acc dtype, lse (h, sq). A row that sees no key: out 0,
    lse +inf, both ways the kernel gets there: flash_fwd_kernel.h compute_attn_1rowblock's
    early exit for row blocks with no key block ("write 0 to gO and gLSE"... then
    gLSE = INFINITY; it covers actual_seqlen_k == 0), and softmax.h normalize_softmax_lse for
    rows whose sum is 0 (lse = INFINITY, out scaled by inv_sum = 1: 0). The split-KV path
    (Split: -INFINITY per split) ends the same: its combine sets lse_logsum = INFINITY."""
    sq, h, d = q.shape
    s = _scores(q, k, scale, softcap, vis)
    lse = torch.logsumexp(s, dim=-1)
    empty = torch.isneginf(lse)
    p = torch.exp(s - torch.where(empty, 0.0, lse).unsqueeze(-1))
    out = torch.einsum("hgqk,khd->qhgd", p, v.to(p.dtype)).reshape(sq, h, d)
    return out, lse.reshape(h, sq).masked_fill(empty.reshape(h, sq), float("inf"))


def backward_sequence(dout, q, k, v, out, lse, scale, softcap, vis):
    """One sequence -> dq, dk, dv in acc dtype, D (h, sq). flash_bwd_preprocess_kernel.h
    compute_dot_do_o: D = rowsum(dO * O) (and dQaccum cleared, so a row with no key gets
    dq 0). flash_bwd_kernel.h: P = exp(s - lse) through softmax.h scale_apply_exp2 with
    Scale_max=false, whose `max == -INFINITY ? 0` makes a row with lse -inf use P = exp(s);
    lse +inf (flash-attn's own empty row) gives P = 0. dS = P (dP - D), times dtanh under
    softcap; a key no row sees gets dk = dv = 0 (P = 0, or the kernel's `m_block < m_block_min`
    exit that writes zeros)."""
    sq, h, d = q.shape
    hk = k.shape[1]
    g = h // hk
    acc = _acc(q.dtype)
    s = _scores(q, k, scale, softcap, vis)
    lse = lse.to(acc).view(hk, g, sq)
    p = torch.exp(s - torch.where(torch.isneginf(lse), 0.0, lse).unsqueeze(-1))
    do = dout.to(acc).view(sq, hk, g, d)
    delta = (do * out.to(acc).view(sq, hk, g, d)).sum(-1).permute(1, 2, 0)  # (hk, g, sq)
    dv = torch.einsum("hgqk,qhgd->khd", p, do)
    ds = p * (torch.einsum("qhgd,khd->hgqk", do, v.to(acc)) - delta.unsqueeze(-1))
    if softcap > 0:  # d(c tanh(x/c))/dx = 1 - tanh^2 = 1 - (s/c)^2; masked: P = 0
        ds = ds * torch.where(vis, 1 - (s / softcap) ** 2, 0)
    ds = ds * scale
    dq = torch.einsum("hgqk,khd->qhgd", ds, k.to(acc)).reshape(sq, h, d)
    dk = torch.einsum("hgqk,qhgd->khd", ds, q.to(acc).view(sq, hk, g, d))
    return dq, dk, dv, delta.reshape(h, sq)


# --- TORCH_CHECKs and buffers: flash_api.cpp -------------------------------------------------

def _check_common(q, k, v, p_dropout, alibi_slopes, softcap, head_size, fwd, release):
    """The checks mha_fwd / mha_varlen_fwd / mha_bwd / mha_varlen_bwd share (dtype fp16/bf16
    and CHECK_DEVICE(x) `x.is_cuda()` are the stand-in's deviations: any float, the CPU)."""
    _check(p_dropout == 0.0, "the CPU stand-in has no dropout")
    _check(alibi_slopes is None, "the CPU stand-in has no ALiBi")
    _check(k.dtype == q.dtype, "query and key must have the same dtype")
    _check(v.dtype == q.dtype, "query and value must have the same dtype")
    for t in (q, k, v):
        _check(t.device.type == "cpu", "the CPU stand-in runs CPU tensors")
        _check(t.stride(-1) == 1, "Input tensor must have contiguous last dimension")
    if fwd:
        _check(head_size <= 256, "FlashAttention forward only supports head dimension at most 256")
        if release >= (2, 7):  # 2.6.3 pads head_size_og to a multiple of 8 itself
            _check(head_size % 8 == 0, "query, key, value, and out_ must have a head_size "
                                       "that is a multiple of 8")
    else:
        _check(head_size % 8 == 0, "head_size should be a multiple of 8")
        _check(head_size <= 256, "FlashAttention backward only supports head dimension at most 256")
    _check(q.shape[-2] % k.shape[-2] == 0,
           "Number of heads in key/value must divide number of heads in query")
    if softcap > 0:
        _check(p_dropout == 0, "Softcapping does not support dropout for now")


def _check_shape(x, name, *shape):
    """flash_api.cpp CHECK_SHAPE."""
    _check(tuple(x.shape) == shape, f"{name} must have shape {shape}")


def _check_buffer(x, name, like_dtype, *shape):
    """An optional output buffer (out_, dq_, dk_, dv_): dtype, contiguous last dim, shape."""
    _check(x.dtype == like_dtype, f"{name} must have the same dtype as q")
    _check(x.stride(-1) == 1, f"{name} must have contiguous last dimension")
    _check_shape(x, name, *shape)


def _pad8(x):
    d = x.shape[-1]
    return x if d % 8 == 0 else torch.nn.functional.pad(x, [0, 8 - d % 8])


def _fill_unwritten(x, written_rows, value=_NAN):
    """Rows (dim 0) the C++ never writes get ``value``: NaN for torch::empty memory."""
    keep = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    for a, b in written_rows:
        keep[a:b] = True
    x[~keep] = value


def make_module(release: tuple[int, int]) -> types.ModuleType:
    """The stand-in ``flash_attn_2_cuda`` for a flash-attn release (major, minor)."""
    padded = release < (2, 7)  # 2.6.3: the C++ pads head_dim and returns the padded tensors

    def fwd_returns(out, out_, lse, q, k, v):
        """fwd/varlen_fwd's return list; ``out_``, when given, is written in place."""
        if out_ is not None:
            out_.copy_(out)
            out = out_
        p = torch.empty(0, dtype=q.dtype, device=q.device)
        if padded:
            return [out, _pad8(q), _pad8(k), _pad8(v), _pad8(out), lse, p, torch.zeros(2, dtype=torch.int64)]
        return [out, lse, p, torch.zeros(2, dtype=torch.int64)]

    def fwd(q, k, v, out_, alibi_slopes, p_dropout, softmax_scale, is_causal, window_size_left,
            window_size_right, softcap, return_softmax, gen_):
        """mha_fwd: q (b, s_q, h, d), k/v (b, s_k, h_k, d) -> lse (b, h, s_q) fp32."""
        b, sq, h, d = q.shape
        sk = k.shape[1]
        _check_common(q, k, v, p_dropout, alibi_slopes, softcap, d, True, release)
        _check(b > 0, "batch size must be positive")
        _check(not return_softmax or p_dropout > 0,
               "return_softmax is only supported when p_dropout > 0.0")
        # one head size for q, k and v: mha_fwd's CHECK_SHAPE(k/v, batch_size, seqlen_k,
        # num_heads_k, head_size) (2.6.3: head_size_og), the rule that makes MLA pad v
        _check_shape(k, "k", b, sk, k.shape[2], d)
        _check_shape(v, "v", b, sk, k.shape[2], d)
        if out_ is not None:
            _check_buffer(out_, "out", q.dtype, b, sq, h, d)
        _check(sk > 0, "the CPU stand-in does not model a dense call with seqlen_k == 0")
        window = fwd_window(sq, sk, is_causal, window_size_left, window_size_right)
        vis = visible(sq, sk, set_params(*window, sk), q.device)
        outs, lses = zip(*(forward_sequence(q[i], k[i], v[i], softmax_scale, softcap, vis)
                           for i in range(b)))
        return fwd_returns(torch.stack(outs).to(q.dtype), out_, torch.stack(lses), q, k, v)

    def _dense_grads(dout, q, k, v, dq_, dk_, dv_):
        """2.6.3 mha_bwd takes dout with the original head size and q/k/v/out padded to a
        multiple of 8 (`head_size == round_multiple(head_size_og, 8)`), returning grads sliced
        back; 2.8.3 takes one head size. -> (dout at q's head size, head_size_og)."""
        d = q.shape[-1]
        og = dout.shape[-1] if padded else d
        _check(-(-og // 8) * 8 == d, "head_size must be head_size_og rounded to a multiple of 8")
        _check_shape(dout, "dout", *q.shape[:-1], og)
        for buf, name, like in ((dq_, "dq", q), (dk_, "dk", k), (dv_, "dv", v)):
            if buf is not None:
                _check_buffer(buf, name, q.dtype, *like.shape)
        return torch.nn.functional.pad(dout, [0, d - og]), og

    def _into(grads, buffers, likes, og):
        """Gradients written into the given dq/dk/dv buffers (new ones where None), sliced to
        the original head size (2.6.3)."""
        written = []
        for g, buf, like in zip(grads, buffers, likes):
            buf = torch.empty_like(like) if buf is None else buf
            buf.copy_(g)
            written.append(buf[..., :og])
        return written

    def bwd(dout, q, k, v, out, softmax_lse, dq_, dk_, dv_, alibi_slopes, p_dropout,
            softmax_scale, is_causal, window_size_left, window_size_right, softcap,
            deterministic, gen_, rng_state):
        """mha_bwd -> (dq, dk, dv, softmax_d (b, h, round_up(s_q, 128)) fp32)."""
        b, sq, h, d = q.shape
        sk = k.shape[1]
        _check_common(q, k, v, p_dropout, alibi_slopes, softcap, d, False, release)
        _check(out.dtype == q.dtype, "query and out must have the same dtype")
        _check(dout.dtype == q.dtype, "query and dout must have the same dtype")
        _check(out.stride(-1) == 1, "out tensor must have contiguous last dimension")
        _check(dout.stride(-1) == 1, "dout tensor must have contiguous last dimension")
        _check(b > 0, "batch size must be positive")
        # one head size for q, k and v: mha_bwd's CHECK_SHAPE(v, batch_size, seqlen_k,
        # num_heads_k, head_size), as mha_fwd's (MLA's narrower v must be padded by the caller)
        _check_shape(k, "k", b, sk, k.shape[2], d)
        _check_shape(v, "v", b, sk, k.shape[2], d)
        dout, og = _dense_grads(dout, q, k, v, dq_, dk_, dv_)
        _check_shape(out, "out", b, sq, h, d)
        # The C++ checks nothing of softmax_lse; its kernel reads it as (b, h, seqlen_q)
        _check(tuple(softmax_lse.shape) == (b, h, sq), "softmax_lse must have shape (b, h, seqlen_q)")
        vis = visible(sq, sk, set_params(*bwd_window(sk, is_causal, window_size_left,
                                                      window_size_right), sk), q.device)
        res = [backward_sequence(dout[i], q[i], k[i], v[i], out[i], softmax_lse[i], softmax_scale,
                                 softcap, vis) for i in range(b)]
        grads = [torch.stack([r[n] for r in res]) for n in range(3)]
        softmax_d = torch.full((b, h, -(-sq // 128) * 128), _NAN, dtype=torch.float32)
        softmax_d[:, :, :sq] = torch.stack([r[3] for r in res])
        return [*_into(grads, (dq_, dk_, dv_), (q, k, v), og), softmax_d]

    def _segments(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k):
        """[(q start, q end, k start, k end)] of each sequence; mha_varlen_*'s checks."""
        for cu, name in ((cu_seqlens_q, "cu_seqlens_q"), (cu_seqlens_k, "cu_seqlens_k")):
            _check(cu.dtype == torch.int32, f"{name} must have dtype int32")
            _check(cu.is_contiguous(), f"{name} must be contiguous")
        batch = cu_seqlens_q.numel() - 1
        _check(batch > 0, "batch size must be positive")
        _check_shape(cu_seqlens_k, "cu_seqlens_k", batch + 1)
        cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
        segments = list(zip(cq[:-1], cq[1:], ck[:-1], ck[1:]))
        for qa, qb, ka, kb in segments:
            _check(0 <= qb - qa <= max_seqlen_q and 0 <= kb - ka <= max_seqlen_k,
                   "the CPU stand-in refuses a sequence longer than max_seqlen (the CUDA grid "
                   "covers max_seqlen rows / keys only)")
        return segments

    def varlen_fwd(q, k, v, out_, cu_seqlens_q, cu_seqlens_k, seqused_k, leftpad_k, block_table,
                   alibi_slopes, max_seqlen_q, max_seqlen_k, p_dropout, softmax_scale,
                   zero_tensors, is_causal, window_size_left, window_size_right, softcap,
                   return_softmax, gen_):
        """mha_varlen_fwd: q (total_q, h, d), k/v (total_k, h_k, d) -> lse (h, total_q) fp32."""
        total_q, h, d = q.shape
        hk = k.shape[1]
        _check_common(q, k, v, p_dropout, alibi_slopes, softcap, d, True, release)
        _check(seqused_k is None and leftpad_k is None and block_table is None,
               "the CPU stand-in has no seqused_k / leftpad_k / paged KV")
        _check(not return_softmax or p_dropout > 0,
               "return_softmax is only supported when p_dropout > 0.0")
        segments = _segments(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
        _check_shape(v, "v", k.shape[0], hk, d)
        if out_ is not None:
            _check_buffer(out_, "out", q.dtype, total_q, h, d)
        # seqlenq_ngroups_swapped (decided before the clamp) reshapes q to (batch, h_k, g, d),
        # which only a total_q of one row per sequence fills
        # (max_seqlen_q == 1 has already turned causal off, so right is the caller's)
        if max_seqlen_q == 1 and h > hk and window_size_left < 0 and window_size_right < 0 \
                and d % 8 == 0:
            _check(total_q == len(segments), f"shape '[{len(segments)}, {hk}, {h // hk}, {d}]' "
                   f"is invalid for input of size {q.numel()}")
        window = varlen_fwd_window(max_seqlen_q, max_seqlen_k, is_causal, window_size_left,
                                   window_size_right)
        params = set_params(*window, max_seqlen_k)
        out = torch.full((total_q, h, d), _NAN, dtype=q.dtype)  # torch::empty_like(q)
        lse = torch.full((h, total_q), _NAN, dtype=_acc(q.dtype))
        if zero_tensors:
            out.zero_()
            lse.fill_(float("-inf"))
        if max_seqlen_k == 0:  # mha_varlen_fwd: no kernel launch, "set the output to 0"
            out.zero_()
            lse.fill_(float("inf"))
            return fwd_returns(out, out_, lse, q, k, v)
        for qa, qb, ka, kb in segments:
            if qb == qa:
                continue  # flash_fwd_kernel.h: `m_block * kBlockM >= actual_seqlen_q` returns
            o, l_ = forward_sequence(q[qa:qb], k[ka:kb], v[ka:kb], softmax_scale, softcap,
                                     visible(qb - qa, kb - ka, params, q.device))
            out[qa:qb], lse[:, qa:qb] = o.to(q.dtype), l_
        if out_ is not None and not zero_tensors:  # rows no sequence covers keep out_'s values
            out = torch.where(out.isnan(), out_, out)
        return fwd_returns(out, out_, lse, q, k, v)

    def varlen_bwd(dout, q, k, v, out, softmax_lse, dq_, dk_, dv_, cu_seqlens_q, cu_seqlens_k,
                   alibi_slopes, max_seqlen_q, max_seqlen_k, p_dropout, softmax_scale,
                   zero_tensors, is_causal, window_size_left, window_size_right, softcap,
                   deterministic, gen_, rng_state):
        """mha_varlen_bwd -> (dq, dk, dv, softmax_d (h, total_q + 128 * batch) fp32: sequence s's
        D at columns cu_seqlens_q[s] + 128 s onwards, flash_bwd_kernel.h row_offset_dpsum)."""
        total_q, h, d = q.shape
        total_k, hk = k.shape[:2]
        _check_common(q, k, v, p_dropout, alibi_slopes, softcap, d, False, release)
        _check(out.dtype == q.dtype and dout.dtype == q.dtype, "query and out must have the same dtype")
        segments = _segments(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
        _check_shape(v, "v", total_k, hk, d)  # mha_varlen_bwd: CHECK_SHAPE(v, total_k, num_heads_k, head_size)
        dout, og = _dense_grads(dout, q, k, v, dq_, dk_, dv_)
        _check_shape(out, "out", total_q, h, d)
        _check(tuple(softmax_lse.shape) == (h, total_q), "softmax_lse must have shape (h, total_q)")
        params = set_params(*bwd_window(max_seqlen_k, is_causal, window_size_left,
                                        window_size_right), max_seqlen_k)
        acc = _acc(q.dtype)
        # unwritten rows: the caller's buffer (MHA dk/dv and dq are written in place), else
        # torch::empty (GQA's dk/dv come from an expanded buffer summed over the group)
        grads = [torch.full(t.shape, _NAN, dtype=acc) if buf is None or (t is not q and hk != h)
                 else buf.to(acc) for t, buf in ((q, dq_), (k, dk_), (v, dv_))]
        softmax_d = torch.full((h, total_q + 128 * len(segments)), _NAN, dtype=torch.float32)
        if zero_tensors:
            for g in grads:
                g.zero_()
            softmax_d.zero_()
        if max_seqlen_q == 0:  # mha_varlen_bwd: no launch, dk/dv expanded and softmax_d zeroed
            grads[1].zero_()
            grads[2].zero_()
            softmax_d.zero_()
        for s, (qa, qb, ka, kb) in enumerate(segments):
            if qb == qa:  # every key block exits at `m_block < m_block_min`, writing zeros
                grads[1][ka:kb] = 0
                grads[2][ka:kb] = 0
                continue
            if kb == ka:  # no key block runs; compute_dot_do_o still clears dQaccum
                grads[0][qa:qb] = 0
            else:
                dq, dk, dv, _ = backward_sequence(
                    dout[qa:qb], q[qa:qb], k[ka:kb], v[ka:kb], out[qa:qb], softmax_lse[:, qa:qb],
                    softmax_scale, softcap, visible(qb - qa, kb - ka, params, q.device))
                grads[0][qa:qb], grads[1][ka:kb], grads[2][ka:kb] = dq, dk, dv
            delta = (dout[qa:qb].to(acc) * out[qa:qb].to(acc)).sum(-1).T
            softmax_d[:, qa + 128 * s:qb + 128 * s] = delta.float()
        return [*_into(grads, (dq_, dk_, dv_), (q, k, v), og), softmax_d]

    module = types.ModuleType(MODULE, "CPU stand-in for flash-attn's compiled kernels (tests only)")
    module.fwd, module.bwd, module.varlen_fwd, module.varlen_bwd = fwd, bwd, varlen_fwd, varlen_bwd
    # What ringattn's flash backend asks the compiled module: which devices it runs
    # (the real flash_attn_2_cuda has no such attribute: CUDA only).
    module.device_types = ("cpu",)
    module.release = release
    return module


def _register_cpu_kernels(interface) -> None:
    """flash-attn >= 2.7: its kernels are custom ops for CUDA only; register the same
    Python functions (flash-attn's own glue that calls the compiled module) for CPU."""
    for name in _OPS:
        op = getattr(interface, name)
        if not isinstance(op, torch._library.custom_ops.CustomOpDef):
            continue  # < 2.7: plain functions, they run on any device
        # ``_init_fn`` is the function flash-attn decorated: its body is the code under test.
        torch.library.register_kernel(f"flash_attn::{name}", "cpu", op._init_fn)


def load_flash_attn():
    """Install the stand-in as ``flash_attn_2_cuda`` and import flash-attn's interface on it
    (idempotent within a process). -> the ``flash_attn.flash_attn_interface`` module."""
    current = sys.modules.get(MODULE)
    if current is None:
        sys.modules[MODULE] = make_module(_release())
    elif getattr(current, "device_types", None) != ("cpu",):
        raise RuntimeError(f"{MODULE} is already imported and is not the CPU stand-in")
    fresh = "flash_attn.flash_attn_interface" not in sys.modules
    interface = importlib.import_module("flash_attn.flash_attn_interface")
    if fresh:
        _register_cpu_kernels(interface)
    return interface
