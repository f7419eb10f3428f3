"""PyTorch's fused attention ops that also return the log-sum-exp.

CPU: ``aten._scaled_dot_product_flash_attention_for_cpu`` (+ its backward), all float dtypes.
CUDA: ``aten._scaled_dot_product_efficient_attention`` (+ backward), fp32/fp16/bf16; it
pads the log-sum-exp to a multiple of 32 query rows, which we strip and re-add.

These ops want (batch, heads, seq, head_dim) and equal head counts, so K/V heads are
repeated here, after they arrived over the ring (only kv_heads travel), and their
gradients summed back over each query-head group.

Irregular blocks: a ``mask`` or a ``window`` band becomes an additive bias (built on the
device, no host sync); packed sequences (``segments``) run one sequence at a time. The
bottom-right causal band of a wide block (window (-1, 0), more keys than queries: the
all-gather strategy's causal rows against every earlier key) needs no bias: it is the keys
before the rows' own, seen in full, plus a top-left causal square, two calls merged exactly
(a bias would be q_len x k_len elements).

v's head size may differ from q/k's (MLA). The CPU flash op refuses that ("Q/K/V should
have the same head size", a TORCH_CHECK of cpu_flash_attention in
aten/src/ATen/native/cpu/FlashAttentionKernel.cpp), so there the smaller side is
zero-padded (``pad_head_dims``, exact) and out and the gradients are sliced back. CUDA
efficient attention takes a value head size of its own (its output is (B, M, H, Kv):
torch/_meta_registrations.py ``meta__scaled_dot_product_efficient_attention``), with an lse
that does not depend on it.
"""
from __future__ import annotations

import torch

from .base import (accumulation_dtype, backward_one_head_size, backward_segments, band, forward_one_head_size,
                   forward_segments, repeat_kv, sum_kv_groups)

_CUDA_LSE_ALIGN = 32  # kAlignLSE in PyTorch's memory-efficient attention


def _causal_split(q, k, mask, window):
    """Where a bottom-right causal band (window (-1, 0), no mask) of a block with more keys
    than queries splits into full keys and a top-left causal square; None otherwise."""
    if mask is not None or window is None or tuple(window) != (-1, 0) or k.shape[1] <= q.shape[1]:
        return None
    return k.shape[1] - q.shape[1]

def _bhsd(x):
    return x.transpose(1, 2)


def _additive(mask, q, k=None, window=None, align=1):
    """bool (q_len, k_len), True = visible, and/or a ``window`` band of q against k ->
    additive bias in q's dtype (0 / -inf), or None. ``align``: the bias is a view into a
    buffer whose rows are padded to a multiple of ``align`` elements (CUDA efficient
    attention wants the bias row stride aligned to 16)."""
    if window is not None:
        wmask = band(q.shape[1], k.shape[1], window, q.device)
        mask = wmask if mask is None else mask.to(q.device) & wmask
    if mask is None:
        return None
    sq, sk = mask.shape
    width = -(-sk // align) * align
    bias = torch.zeros(sq, width, dtype=q.dtype, device=q.device)[:, :sk]
    return bias.masked_fill_(~mask.to(q.device), float("-inf"))


class CpuFlash:
    """CPU: ``aten._scaled_dot_product_flash_attention_for_cpu`` (+ its backward); lse
    (b, h, s_q) as is, the bias as built. q, k and v must share one head size."""
    bias_align = 1
    one_head_size = True

    def forward(self, qt, kt, vt, bias, causal, scale):
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            qt, kt, vt, 0.0, causal, attn_mask=bias, scale=scale)
        return out, lse

    def backward(self, dout_t, qt, kt, vt, out_t, lse, bias, causal, scale):
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout_t, qt, kt, vt, out_t, lse.contiguous(), 0.0, causal, attn_mask=bias, scale=scale)


class EfficientAttention:
    """CUDA: ``aten._scaled_dot_product_efficient_attention`` (+ its backward). Its contract,
    which this class meets: the bias (b, h, s_q, s_k) with 16-aligned rows (``bias_align``,
    expanded from one (s_q, s_k) buffer); the lse comes back padded to a multiple of 32 query
    rows (kAlignLSE), which forward strips and backward re-adds; backward takes the philox
    seed and offset (unused without dropout: zeros on the device).

    ``forward_op`` / ``backward_op`` default to torch's ops; the test suite passes a CPU
    stand-in of their contract, so this branch's own logic runs (and is device-checked)
    without a GPU."""
    bias_align = 16
    lse_align = _CUDA_LSE_ALIGN
    one_head_size = False  # v's head size is its own: out (B, H, M, Kv)

    def __init__(self, forward_op=None, backward_op=None):
        self.forward_op = forward_op or torch.ops.aten._scaled_dot_product_efficient_attention.default
        self.backward_op = backward_op or \
            torch.ops.aten._scaled_dot_product_efficient_attention_backward.default

    @staticmethod
    def _bias(bias, qt):
        return None if bias is None else bias.expand(qt.shape[0], qt.shape[1], *bias.shape)

    def forward(self, qt, kt, vt, bias, causal, scale):
        out, lse, _, _ = self.forward_op(qt, kt, vt, self._bias(bias, qt), True, 0.0, causal,
                                         scale=scale)
        return out, lse[..., : qt.shape[2]]

    def backward(self, dout_t, qt, kt, vt, out_t, lse, bias, causal, scale):
        sq = qt.shape[2]
        padded = -(-sq // self.lse_align) * self.lse_align
        lse_p = torch.nn.functional.pad(lse, (0, padded - sq)).contiguous()
        seed = torch.zeros((), dtype=torch.int64, device=qt.device)
        dq, dk, dv, _ = self.backward_op(
            dout_t, qt, kt, vt, self._bias(bias, qt), out_t, lse_p, seed, seed, 0.0,
            [True, True, True, False], causal, scale=scale)
        return dq, dk, dv


class SdpaBackend:
    name = "sdpa"
    supports_mask = True
    supports_softcap = False  # the fused ops have no score hook; softcap goes to ``math``
    supports_window = True  # as a bias
    supports_varlen = True  # one call per sequence

    def __init__(self, fused=None):
        """``fused``: the op pair to run (``CpuFlash()`` / ``EfficientAttention()``); None:
        chosen by q's device (CPU: the CPU flash op, else efficient attention)."""
        self.fused = fused

    def _ops(self, device):
        if self.fused is not None:
            return self.fused
        return _CPU_FLASH if device.type == "cpu" else _EFFICIENT

    def supports(self, q):
        if q.device.type == "cpu":
            if q.dtype not in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
                return f"dtype {q.dtype} is not supported by the CPU flash attention op"
            return None
        if q.device.type == "cuda":
            if q.dtype not in (torch.float32, torch.bfloat16, torch.float16):
                return f"dtype {q.dtype} is not supported by the CUDA efficient attention op"
            if q.shape[-1] % 8:
                return f"head_dim {q.shape[-1]} is not a multiple of 8 (CUDA efficient attention)"
            return None
        return f"device type {q.device.type!r} has no fused SDPA op with log-sum-exp"

    def forward(self, q, k, v, *, causal, scale, mask=None, softcap=None, window=None,
                segments=None, cu_seqlens=None):
        assert softcap is None, "sdpa has no softcap (get_backend routes softcap elsewhere)"
        if q.shape[-1] != v.shape[-1] and self._ops(q.device).one_head_size:
            return forward_one_head_size(self.forward, q, k, v, causal=causal, scale=scale, mask=mask,
                                         window=window, segments=segments)
        if segments is not None:
            return forward_segments(self.forward, q, k, v, segments, causal=causal, scale=scale,
                                    mask=mask, window=window)
        split = _causal_split(q, k, mask, window)
        if split is not None:  # full keys [0, split) + top-left causal [split, k_len)
            o1, l1 = self.forward(q, k[:, :split], v[:, :split], causal=False, scale=scale)
            o2, l2 = self.forward(q, k[:, split:], v[:, split:], causal=True, scale=scale)
            acc = accumulation_dtype(q.dtype)
            lse = torch.logaddexp(l1.to(acc), l2.to(acc))
            w1, w2 = (torch.exp(x.to(acc) - lse).transpose(1, 2).unsqueeze(-1) for x in (l1, l2))
            return (o1.to(acc) * w1 + o2.to(acc) * w2).to(q.dtype), lse.to(l1.dtype)
        ops = self._ops(q.device)
        groups = q.shape[2] // k.shape[2]
        qt, kt, vt = _bhsd(q), _bhsd(repeat_kv(k, groups)), _bhsd(repeat_kv(v, groups))
        out, lse = ops.forward(qt, kt, vt, _additive(mask, q, k, window, ops.bias_align),
                               causal, scale)
        return _bhsd(out), lse

    def backward(self, dout, q, k, v, out, lse, *, causal, scale, mask=None, softcap=None,
                 window=None, segments=None, cu_seqlens=None):
        assert softcap is None, "sdpa has no softcap (get_backend routes softcap elsewhere)"
        if q.shape[-1] != v.shape[-1] and self._ops(q.device).one_head_size:
            return backward_one_head_size(self.backward, dout, q, k, v, out, lse, causal=causal, scale=scale,
                                          mask=mask, window=window, segments=segments)
        if segments is not None:
            return backward_segments(self.backward, dout, q, k, v, out, lse, segments,
                                     causal=causal, scale=scale, mask=mask, window=window)
        split = _causal_split(q, k, mask, window)
        if split is not None:  # each part's exact gradients from the final out and lse
            dq1, dk1, dv1 = self.backward(dout, q, k[:, :split], v[:, :split], out, lse,
                                          causal=False, scale=scale)
            dq2, dk2, dv2 = self.backward(dout, q, k[:, split:], v[:, split:], out, lse,
                                          causal=True, scale=scale)
            return dq1 + dq2, torch.cat([dk1, dk2], dim=1), torch.cat([dv1, dv2], dim=1)
        ops = self._ops(q.device)
        groups = q.shape[2] // k.shape[2]
        qt, kt, vt = _bhsd(q), _bhsd(repeat_kv(k, groups)), _bhsd(repeat_kv(v, groups))
        dout_t, out_t = _bhsd(dout.to(q.dtype)), _bhsd(out.to(q.dtype))
        dq, dk, dv = ops.backward(dout_t, qt, kt, vt, out_t, lse,
                                  _additive(mask, q, k, window, ops.bias_align), causal, scale)
        return _bhsd(dq), sum_kv_groups(_bhsd(dk), groups), sum_kv_groups(_bhsd(dv), groups)


_CPU_FLASH, _EFFICIENT = CpuFlash(), EfficientAttention()
