"""A CPU stand-in for FlashAttention-3's Python interface, ``flash_attn_interface`` (the
module flash-attention's hopper/ package installs, and the one torch's FA3 registration
imports), for ringattn's ``fa3`` backend without a Hopper GPU.

    from tests.fa3_standin import load_fa3
    fa3 = load_fa3()   # sys.modules["flash_attn_interface"], this stand-in

FA3 cannot be installed here: hopper/setup.py always builds its CUDA extension, and its Python
interface imports the compiled ``flash_attn_3._C`` at import. Its source is not copied either;
the stand-in implements the two internal entry points ringattn calls, with the argument lists
of hopper/flash_attn_interface.py ``_flash_attn_forward`` / ``_flash_attn_backward`` (the
custom ops ``flash_attn_3::_flash_attn_forward`` / ``_backward``), and the conventions of
hopper/flash_api.cpp, read at flash-attention commit 0251105a, each below naming its source.
Deviations, on purpose: CPU tensors of any float dtype (FA3 takes fp16/bf16/fp8 on sm90),
math in fp32 (fp64 for fp64 inputs, so float64 checks are exact); varlen only (cu_seqlens given);
no paged KV, seqused, rotary, k_new, qv, descale, attention_chunk, num_splits (refused or ignored).
"""
from __future__ import annotations

import contextlib
import sys
import types

import torch

MODULE = "flash_attn_interface"
INF = float("inf")


def _check(cond, msg):
    if not cond:
        raise RuntimeError(msg)  # TORCH_CHECK raises RuntimeError


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def fwd_window(max_seqlen_q, max_seqlen_k, is_causal, left, right):
    """hopper/flash_api.cpp mha_fwd, in order: `window_size_left >= seqlen_k - 1 -> -1`,
    `window_size_right >= seqlen_q - 1 -> -1` (varlen: seqlen_q/k are max_seqlen_q/k), causal
    turned off when seqlen_q == 1 and no window, `is_causal -> right = 0`; then set_params_fprop
    makes is_causal = left < 0 && right == 0 and, for a local window, an open side
    `left = seqlen_k - 1`, `right = seqlen_q - 1`. -> (is_causal, is_local, left, right)."""
    left = -1 if left >= max_seqlen_k - 1 else left
    right = -1 if right >= max_seqlen_q - 1 else right
    if max_seqlen_q == 1 and left == -1 and right == -1:
        is_causal = False
    right = 0 if is_causal else right
    is_causal = left < 0 and right == 0
    is_local = (left >= 0 or right >= 0) and not is_causal
    return (is_causal, is_local, max_seqlen_k - 1 if left < 0 else left,
            max_seqlen_q - 1 if right < 0 else right)


def bwd_window(max_seqlen_q, max_seqlen_k, is_causal, left, right):
    """hopper/flash_api.cpp mha_bwd: the same clamp against seqlen_k - 1 / seqlen_q - 1, then
    `is_causal -> right = 0`, `is_causal = left < 0 && right == 0` (no seqlen_q == 1 rule),
    and set_params_bprop's open sides as in forward."""
    left = -1 if left >= max_seqlen_k - 1 else left
    right = -1 if right >= max_seqlen_q - 1 else right
    right = 0 if is_causal else right
    is_causal = left < 0 and right == 0
    is_local = (left >= 0 or right >= 0) and not is_causal
    return (is_causal, is_local, max_seqlen_k - 1 if left < 0 else left,
            max_seqlen_q - 1 if right < 0 else right)


def visible(s_q, s_k, params):
    """hopper/mask.h Mask::apply with the sequence's actual lengths (seqlen.h): causal keeps
    col < row + 1 + s_k - s_q; local keeps col < row + 1 + s_k - s_q + right and
    col >= row + s_k - s_q - left (bottom-right aligned); neither: every key. -> bool (s_q, s_k)."""
    is_causal, is_local, left, right = params
    i = torch.arange(s_q)[:, None] + (s_k - s_q)
    j = torch.arange(s_k)[None, :]
    ok = torch.ones(s_q, s_k, dtype=torch.bool)
    if is_causal:
        ok &= j <= i
    if is_local:
        ok &= (j <= i + right) & (j >= i - left)
    return ok


def _scores(q, k, scale, softcap, vis):
    """q (sq, h, d), k (sk, hk, d) -> masked scores (h, sq, sk); K head h // (h / hk) (GQA);
    softcap: hopper/softmax.h / utils.h apply_softcap, c * tanh(scale * q.k / c)."""
    g = q.shape[1] // k.shape[1]
    acc = _acc(q.dtype)
    s = torch.einsum("qhd,khd->hqk", q.to(acc), k.to(acc).repeat_interleave(g, 1)) * scale
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    return s.masked_fill(~vis, -INF)


def forward_sequence(q, k, v, scale, softcap, vis):
    """-> out (sq, h, dv), lse (h, sq). A row with no visible key: out 0 and lse -inf
    (hopper/softmax.h finalize: `sum == 0 -> row_sum = -INFINITY`; epilogue_fwd.hpp store_zero
    for a row block with no key block: "Write 0 to output and -inf to LSE")."""
    g = q.shape[1] // k.shape[1]
    s = _scores(q, k, scale, softcap, vis)
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - torch.where(torch.isneginf(lse), 0, lse)[..., None])
    out = torch.einsum("hqk,khd->qhd", p, v.to(p.dtype).repeat_interleave(g, 1))
    return out, lse


def backward_sequence(dout, q, k, v, out, lse, scale, softcap, vis):
    """hopper/flash_bwd_preprocess_kernel.h: D = rowsum(dO * O), LSE * log2(e) with
    `lse == -INFINITY ? 0`; mainloop_bwd: P = exp(S - LSE), dS = P (dP - D) (dtanh before
    masking under softcap); GQA: dK/dV summed over each group (hopper's dk_accum). -> dq, dk, dv."""
    hk, g = k.shape[1], q.shape[1] // k.shape[1]
    acc = _acc(q.dtype)
    s = _scores(q, k, scale, softcap, vis)
    lse = lse.to(acc)
    p = torch.exp(s - torch.where(torch.isneginf(lse), 0, lse)[..., None])
    do = dout.to(acc)
    delta = (do * out.to(acc)).sum(-1).T  # (h, sq)
    vv, kk = v.to(acc).repeat_interleave(g, 1), k.to(acc).repeat_interleave(g, 1)
    dv = torch.einsum("hqk,qhd->khd", p, do)
    ds = p * (torch.einsum("qhd,khd->hqk", do, vv) - delta[..., None])
    if softcap > 0:
        ds = ds * torch.where(vis, 1 - (s / softcap) ** 2, 0)
    ds = ds * scale
    dq = torch.einsum("hqk,khd->qhd", ds, kk)
    dk = torch.einsum("hqk,qhd->khd", ds, q.to(acc))
    fold = lambda x: x.view(x.shape[0], hk, g, x.shape[-1]).sum(2)  # noqa: E731
    return dq, fold(dk), fold(dv)


def _segments(cu_q, cu_k, max_q, max_k):
    cq, ck = cu_q.tolist(), cu_k.tolist()
    _check(cu_q.dtype == torch.int32 and cu_k.dtype == torch.int32, "cu_seqlens must have dtype torch.int32")
    _check(len(cq) == len(ck), "cu_seqlens_k must have shape (batch_size + 1)")
    spans = list(zip(cq[:-1], cq[1:], ck[:-1], ck[1:]))
    for a, b, c, d in spans:
        _check(b - a <= max_q and d - c <= max_k,
               "the CPU stand-in refuses a sequence longer than max_seqlen (the grid covers only those)")
    return spans


def _check_head_dims(q, v):
    """hopper/flash_api.cpp mha_fwd: head_size <= 256 (get_max_headdim), a multiple of 8
    (alignment for 16-bit types); a V head dim of its own only for Q/K in (128, 192] with V in
    (96, 128], or Q/K <= 64 with V <= 512 (and only on Hopper)."""
    d, dv = q.shape[-1], v.shape[-1]
    _check(d <= 256, "FlashAttention forward only supports head dimension at most 256")
    _check(d % 8 == 0 and dv % 8 == 0, "head_size should be a multiple of 8")
    if dv != d:
        _check((128 < d <= 192 and 96 < dv <= 128) or (d <= 64 and dv <= 512),
               "If V headdim is different from Q/K dim, we only support Q/K headdim in (128, 192] "
               "and V headdim in (96, 128], or (Q/K <= 64 and V <= 512).")


def _flash_attn_forward(q, k, v, k_new=None, v_new=None, qv=None, out_=None, cu_seqlens_q=None,
                        cu_seqlens_k=None, cu_seqlens_k_new=None, seqused_q=None, seqused_k=None,
                        max_seqlen_q=None, max_seqlen_k=None, page_table=None, kv_batch_idx=None,
                        leftpad_k=None, rotary_cos=None, rotary_sin=None, seqlens_rotary=None,
                        q_descale=None, k_descale=None, v_descale=None, softmax_scale=None,
                        causal=False, window_size_left=-1, window_size_right=-1, attention_chunk=0,
                        softcap=0.0, rotary_interleaved=True, scheduler_metadata=None, num_splits=1,
                        pack_gqa=None, sm_margin=0):
    """hopper/flash_attn_interface.py _flash_attn_forward -> (out (total_q, h, dv), softmax_lse
    (h, total_q) fp32 (hopper/flash_api.cpp mha_fwd: `torch::empty({num_heads, total_q})` under
    cu_seqlens_q), out_accum, softmax_lse_accum (empty without splits))."""
    _check(cu_seqlens_q is not None and cu_seqlens_k is not None, "the CPU stand-in models varlen only")
    _check(all(x is None for x in (k_new, v_new, qv, out_, seqused_q, seqused_k, page_table,
                                   kv_batch_idx, leftpad_k, rotary_cos, q_descale)) and attention_chunk == 0,
           "the CPU stand-in has no k_new / qv / out_ / seqused / paged KV / rotary / fp8 / chunks")
    _check(q.shape[1] % k.shape[1] == 0, "Number of heads in key/value must divide number of heads in query")
    _check_head_dims(q, v)
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    total_q, h, _ = q.shape
    out = torch.zeros(total_q, h, v.shape[-1], dtype=q.dtype)
    lse = torch.full((h, total_q), -INF, dtype=_acc(q.dtype))
    spans = _segments(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    if max_seqlen_k == 0:  # mha_fwd: "If seqlen_k == 0 ... set the output to 0", lse +inf
        lse.fill_(INF)
    else:
        params = fwd_window(max_seqlen_q, max_seqlen_k, causal, window_size_left, window_size_right)
        for a, b, c, d in spans:
            if b > a:
                o, l_ = forward_sequence(q[a:b], k[c:d], v[c:d], scale, softcap,
                                         visible(b - a, d - c, params))
                out[a:b], lse[:, a:b] = o.to(q.dtype), l_
    empty = torch.empty(0)
    return out, lse, empty, empty


def _flash_attn_backward(dout, q, k, v, out, softmax_lse, cu_seqlens_q=None, cu_seqlens_k=None,
                         sequed_q=None, sequed_k=None, max_seqlen_q=None, max_seqlen_k=None,
                         dq=None, dk=None, dv=None, softmax_scale=None, is_causal=False,
                         window_size_left=-1, window_size_right=-1, softcap=0.0,
                         deterministic=False, sm_margin=0):
    """hopper/flash_attn_interface.py _flash_attn_backward: dq/dk/dv written into the given
    buffers (mutates_args), returns softmax_d (h, total_q) here (the C++'s is padded)."""
    _check(cu_seqlens_q is not None and cu_seqlens_k is not None, "the CPU stand-in models varlen only")
    _check(dq is not None and dk is not None and dv is not None, "the CPU stand-in wants dq, dk, dv buffers")
    _check(tuple(softmax_lse.shape) == (q.shape[1], q.shape[0]), "softmax_lse must be (h, total_q)")
    _check(max(q.shape[-1], v.shape[-1]) <= 256, "FlashAttention backward only supports head dimension at most 256")
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    params = bwd_window(max_seqlen_q, max_seqlen_k, is_causal, window_size_left, window_size_right)
    acc = _acc(q.dtype)
    grads = [torch.zeros(t.shape, dtype=acc) for t in (q, k, v)]
    for a, b, c, d in _segments(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k):
        if b > a and d > c:
            g = backward_sequence(dout[a:b], q[a:b], k[c:d], v[c:d], out[a:b], softmax_lse[:, a:b],
                                  scale, softcap, visible(b - a, d - c, params))
            grads[0][a:b], grads[1][c:d], grads[2][c:d] = g
    for buf, g in zip((dq, dk, dv), grads):
        buf.copy_(g)
    return (dout.to(acc) * out.to(acc)).sum(-1).T.float()


def load_fa3() -> types.ModuleType:
    """Install the stand-in as ``flash_attn_interface`` (idempotent) -> the module."""
    current = sys.modules.get(MODULE)
    if current is not None:
        _check(getattr(current, "device_types", None) == ("cpu",),
               f"{MODULE} is already imported and is not the CPU stand-in")
        return current
    module = types.ModuleType(MODULE, "CPU stand-in for FlashAttention-3's interface (tests only)")
    module._flash_attn_forward = _flash_attn_forward
    module._flash_attn_backward = _flash_attn_backward
    # What ringattn's fa3 backend asks: which devices it runs (the real module has no such
    # attribute: CUDA only).
    module.device_types = ("cpu",)
    sys.modules[MODULE] = module
    return module


def unload_fa3() -> None:
    if getattr(sys.modules.get(MODULE), "device_types", None) == ("cpu",):
        del sys.modules[MODULE]


@contextlib.contextmanager
def fa3_on_cpu():
    """The stand-in as ``flash_attn_interface`` while the context is open."""
    load_fa3()
    try:
        yield
    finally:
        unload_fa3()
