"""A CPU stand-in for flash-attn's compiled module, so that flash-attn's own Python package
(installed without its CUDA build) runs unchanged on CPU tensors.

    from tests.flash_attn_standin import load_flash_attn
    fa = load_flash_attn()   # flash_attn.flash_attn_interface, on the stand-in

``fwd``, ``bwd``, ``varlen_fwd``, ``varlen_bwd`` take the argument lists of the C++ functions
in flash-attn's csrc/flash_attn/flash_api.cpp (mha_fwd, mha_bwd, mha_varlen_fwd,
mha_varlen_bwd) and return what they return for the installed release:
    < 2.7: fwd/varlen_fwd -> (out, q_padded, k_padded, v_padded, out_padded, lse, p, rng_state)
    >= 2.7: fwd/varlen_fwd -> (out, lse, p, rng_state)   (head padding moved to Python)
    bwd/varlen_bwd -> (dq, dk, dv, softmax_d), dq/dk/dv written into the given buffers.
Conventions kept from the CUDA kernels: lse (b, h, s_q), varlen (h, total_q); causal and
windows bottom-right aligned (query i of s_q sees keys j with
i + s_k - s_q - left <= j <= i + s_k - s_q + right, causal = right 0), per sequence under
varlen; windows >= s_k (varlen: max_seqlen_k) mean unbounded; s_q == 1 turns causal off;
softcap c: scores -> c * tanh(scores / c); GQA without repeating K/V; a row that sees no key
gets out 0 and lse +inf. Deviations: any float dtype and the CPU (the C++ takes fp16/bf16 on
CUDA only), math in fp32 (fp64 for fp64 inputs, lse too), no dropout, no alibi, no paged KV.

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


def _release() -> tuple[int, int]:
    major, minor = importlib.metadata.version("flash_attn").split(".")[:2]
    return int(major), int(minor)


def _check(cond, msg):
    if not cond:
        raise RuntimeError(msg)  # TORCH_CHECK raises RuntimeError


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _window(sq, sk, causal, left, right):
    """mha_fwd's normalisation: windows >= s_k are unbounded, causal is right = 0."""
    if left >= sk:
        left = -1
    if right >= sk:
        right = -1
    if sq == 1:
        causal = False
    if causal:
        right = 0
    return left, right


def _visible(sq, sk, left, right, device):
    """bool (sq, sk): bottom-right aligned band."""
    i = torch.arange(sq, device=device)[:, None] + (sk - sq)
    j = torch.arange(sk, device=device)[None, :]
    ok = torch.ones(sq, sk, dtype=torch.bool, device=device)
    if left >= 0:
        ok &= j >= i - left
    if right >= 0:
        ok &= j <= i + right
    return ok


def _scores(q, k, scale, softcap, visible):
    """q (sq, h, d), k (sk, hk, d) -> fp32/fp64 scores (hk, g, sq, sk), capped and masked."""
    sq, h, d = q.shape
    hk = k.shape[1]
    acc = _acc(q.dtype)
    s = torch.einsum("qhgd,khd->hgqk", q.to(acc).view(sq, hk, h // hk, d), k.to(acc)) * scale
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    return s.masked_fill(~visible, float("-inf"))


def _forward_one(q, k, v, scale, softcap, visible):
    """One sequence: q (sq, h, d) -> out (sq, h, d) in acc dtype, lse (h, sq)."""
    sq, h, d = q.shape
    s = _scores(q, k, scale, softcap, visible)
    lse = torch.logsumexp(s, dim=-1)
    empty = torch.isneginf(lse)
    p = torch.exp(s - torch.where(empty, 0.0, lse).unsqueeze(-1))
    out = torch.einsum("hgqk,khd->qhgd", p, v.to(p.dtype)).reshape(sq, h, d)
    return out, lse.reshape(h, sq).masked_fill(empty.reshape(h, sq), float("inf"))


def _backward_one(dout, q, k, v, out, lse, scale, softcap, visible):
    """One sequence -> dq, dk, dv in acc dtype, softmax_d (h, sq) = rowsum(dO * O)."""
    sq, h, d = q.shape
    hk = k.shape[1]
    g = h // hk
    acc = _acc(q.dtype)
    s = _scores(q, k, scale, softcap, visible)
    lse = lse.to(acc).view(hk, g, sq)
    p = torch.exp(s - torch.where(torch.isinf(lse), 0.0, lse).unsqueeze(-1)).masked_fill(~visible, 0)
    do = dout.to(acc).view(sq, hk, g, d)
    delta = (do * out.to(acc).view(sq, hk, g, d)).sum(-1).permute(1, 2, 0)  # (hk, g, sq)
    dv = torch.einsum("hgqk,qhgd->khd", p, do)
    ds = p * (torch.einsum("qhgd,khd->hgqk", do, v.to(acc)) - delta.unsqueeze(-1))
    if softcap > 0:  # d(c tanh(x/c))/dx = 1 - tanh^2 = 1 - (s/c)^2
        ds = ds * torch.where(visible, 1 - (s / softcap) ** 2, 0)
    ds = ds * scale
    dq = torch.einsum("hgqk,khd->qhgd", ds, k.to(acc)).reshape(sq, h, d)
    dk = torch.einsum("hgqk,qhgd->khd", ds, q.to(acc).view(sq, hk, g, d))
    return dq, dk, dv, delta.reshape(h, sq)


def _check_inputs(q, k, v, p_dropout, alibi_slopes, head_size_multiple_of_8):
    _check(p_dropout == 0.0, "the CPU stand-in has no dropout")
    _check(alibi_slopes is None, "the CPU stand-in has no ALiBi")
    _check(q.dtype == k.dtype == v.dtype, "query and key must have the same dtype")
    _check(q.stride(-1) == 1 and k.stride(-1) == 1 and v.stride(-1) == 1,
           "Input tensor must have contiguous last dimension")
    d = q.shape[-1]
    _check(d <= 256, "FlashAttention forward only supports head dimension at most 256")
    if head_size_multiple_of_8:
        _check(d % 8 == 0, "query, key, value, and out_ must have a head_size that is a multiple of 8")
    _check(q.shape[-2] % k.shape[-2] == 0,
           "Number of heads in key/value must divide number of heads in query")


def _rng_state(device):
    return torch.zeros(2, dtype=torch.int64, device=device)


def _pad8(x):
    d = x.shape[-1]
    return x if d % 8 == 0 else torch.nn.functional.pad(x, [0, 8 - d % 8])


def _into(grads, buffers, likes):
    """Gradients written into the given dq/dk/dv buffers (new ones where None), as the C++."""
    written = []
    for g, buf, like in zip(grads, buffers, likes):
        buf = torch.empty_like(like) if buf is None else buf
        buf.copy_(g)
        written.append(buf)
    return written


def make_module(release: tuple[int, int]) -> types.ModuleType:
    """The stand-in ``flash_attn_2_cuda`` for a flash-attn release (major, minor)."""
    padded_returns = release < (2, 7)  # 2.6: C++ pads head_dim and returns the padded tensors

    def fwd_returns(out, out_, lse, q, k, v):
        """fwd/varlen_fwd's return list; ``out_``, when given, is written in place."""
        if out_ is not None:
            out_.copy_(out)
            out = out_
        p = torch.empty(0, dtype=q.dtype, device=q.device)
        if padded_returns:
            return [out, _pad8(q), _pad8(k), _pad8(v), _pad8(out), lse, p, _rng_state(q.device)]
        return [out, lse, p, _rng_state(q.device)]

    def fwd(q, k, v, out_, alibi_slopes, p_dropout, softmax_scale, is_causal, window_size_left,
            window_size_right, softcap, return_softmax, gen_):
        _check_inputs(q, k, v, p_dropout, alibi_slopes, not padded_returns)
        b, sq, h, d = q.shape
        sk = k.shape[1]
        left, right = _window(sq, sk, is_causal, window_size_left, window_size_right)
        visible = _visible(sq, sk, left, right, q.device)
        outs, lses = zip(*(_forward_one(q[i], k[i], v[i], softmax_scale, softcap, visible)
                           for i in range(b)))
        out = torch.stack(outs).to(q.dtype)
        lse = torch.stack(lses)
        return fwd_returns(out, out_, lse, q, k, v)

    def bwd(dout, q, k, v, out, softmax_lse, dq_, dk_, dv_, alibi_slopes, p_dropout,
            softmax_scale, is_causal, window_size_left, window_size_right, softcap,
            deterministic, gen_, rng_state):
        _check_inputs(q, k, v, p_dropout, alibi_slopes, not padded_returns)
        b, sq, h, d = q.shape
        sk = k.shape[1]
        _check(tuple(softmax_lse.shape) == (b, h, sq), "softmax_lse must have shape (b, h, seqlen_q)")
        left, right = _window(sq, sk, is_causal, window_size_left, window_size_right)
        visible = _visible(sq, sk, left, right, q.device)
        res = [_backward_one(dout[i], q[i], k[i], v[i], out[i], softmax_lse[i], softmax_scale,
                             softcap, visible) for i in range(b)]
        grads = [torch.stack([r[n] for r in res]) for n in range(3)]
        written = _into(grads, (dq_, dk_, dv_), (q, k, v))
        rounded = -(-sq // 128) * 128
        softmax_d = torch.zeros(b, h, rounded, dtype=torch.float32, device=q.device)
        softmax_d[:, :, :sq] = torch.stack([r[3] for r in res])
        return [*written, softmax_d]

    def _segments(cu_seqlens_q, cu_seqlens_k):
        cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
        _check(len(cq) == len(ck), "cu_seqlens_q and cu_seqlens_k must have the same length")
        return list(zip(cq[:-1], cq[1:], ck[:-1], ck[1:]))

    def varlen_fwd(q, k, v, out_, cu_seqlens_q, cu_seqlens_k, seqused_k, leftpad_k, block_table,
                   alibi_slopes, max_seqlen_q, max_seqlen_k, p_dropout, softmax_scale,
                   zero_tensors, is_causal, window_size_left, window_size_right, softcap,
                   return_softmax, gen_):
        _check_inputs(q, k, v, p_dropout, alibi_slopes, not padded_returns)
        _check(seqused_k is None and leftpad_k is None and block_table is None,
               "the CPU stand-in has no seqused_k / leftpad_k / paged KV")
        _check(cu_seqlens_q.dtype == cu_seqlens_k.dtype == torch.int32, "cu_seqlens must have dtype int32")
        total_q, h, d = q.shape
        if window_size_left >= max_seqlen_k:
            window_size_left = -1
        if window_size_right >= max_seqlen_k:
            window_size_right = -1
        causal = is_causal and max_seqlen_q != 1
        out = torch.zeros(total_q, h, d, dtype=q.dtype, device=q.device)
        lse = torch.full((h, total_q), float("inf"), dtype=_acc(q.dtype), device=q.device)
        for qa, qb, ka, kb in _segments(cu_seqlens_q, cu_seqlens_k):
            sq, sk = qb - qa, kb - ka
            _check(sq <= max_seqlen_q and sk <= max_seqlen_k, "a sequence is longer than max_seqlen")
            if sq == 0 or sk == 0:
                continue
            visible = _visible(sq, sk, window_size_left, 0 if causal else window_size_right, q.device)
            o, l_ = _forward_one(q[qa:qb], k[ka:kb], v[ka:kb], softmax_scale, softcap, visible)
            out[qa:qb], lse[:, qa:qb] = o.to(q.dtype), l_
        return fwd_returns(out, out_, lse, q, k, v)

    def varlen_bwd(dout, q, k, v, out, softmax_lse, dq_, dk_, dv_, cu_seqlens_q, cu_seqlens_k,
                   alibi_slopes, max_seqlen_q, max_seqlen_k, p_dropout, softmax_scale,
                   zero_tensors, is_causal, window_size_left, window_size_right, softcap,
                   deterministic, gen_, rng_state):
        _check_inputs(q, k, v, p_dropout, alibi_slopes, not padded_returns)
        total_q, h, d = q.shape
        _check(tuple(softmax_lse.shape) == (h, total_q), "softmax_lse must have shape (h, total_q)")
        if window_size_left >= max_seqlen_k:
            window_size_left = -1
        if window_size_right >= max_seqlen_k:
            window_size_right = -1
        causal = is_causal and max_seqlen_q != 1
        grads = [torch.zeros(t.shape, dtype=_acc(q.dtype), device=q.device) for t in (q, k, v)]
        segments = _segments(cu_seqlens_q, cu_seqlens_k)
        softmax_d = torch.zeros(h, total_q + 128 * len(segments), dtype=torch.float32, device=q.device)
        for qa, qb, ka, kb in segments:
            sq, sk = qb - qa, kb - ka
            if sq == 0 or sk == 0:
                continue
            visible = _visible(sq, sk, window_size_left, 0 if causal else window_size_right, q.device)
            dq, dk, dv, delta = _backward_one(dout[qa:qb], q[qa:qb], k[ka:kb], v[ka:kb], out[qa:qb],
                                              softmax_lse[:, qa:qb], softmax_scale, softcap, visible)
            grads[0][qa:qb] += dq
            grads[1][ka:kb] += dk
            grads[2][ka:kb] += dv
            softmax_d[:, qa:qb] = delta
        written = _into(grads, (dq_, dk_, dv_), (q, k, v))
        return [*written, softmax_d]

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
