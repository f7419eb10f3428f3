"""PyTorch's fused attention ops that also return the log-sum-exp.

CPU: ``aten._scaled_dot_product_flash_attention_for_cpu`` (+ its backward), all float dtypes.
CUDA: ``aten._scaled_dot_product_efficient_attention`` (+ backward), fp32/fp16/bf16; it
pads the log-sum-exp to a multiple of 32 query rows, which we strip and re-add.

These ops want (batch, heads, seq, head_dim) and equal head counts, so K/V heads are
repeated here, after they arrived over the ring (only kv_heads travel), and their
gradients summed back over each query-head group.

Irregular blocks: a ``mask`` or a ``window`` band becomes an additive bias (built on the
device, no host sync); packed sequences (``segments``) run one sequence at a time.
"""
from __future__ import annotations

import torch

from .base import backward_segments, band, forward_segments, repeat_kv, sum_kv_groups

_CUDA_LSE_ALIGN = 32  # kAlignLSE in PyTorch's memory-efficient attention


def _bhsd(x):
    return x.transpose(1, 2)


def _additive(mask, q, k=None, window=None):
    """bool (q_len, k_len), True = visible, and/or a ``window`` band of q against k ->
    additive bias in q's dtype (0 / -inf), or None.

    CUDA efficient attention wants the bias row stride aligned to 16 elements, so the
    bias is a view into a padded buffer there.
    """
    if window is not None:
        wmask = band(q.shape[1], k.shape[1], window, q.device)
        mask = wmask if mask is None else mask.to(q.device) & wmask
    if mask is None:
        return None
    sq, sk = mask.shape
    width = -(-sk // 16) * 16 if q.device.type == "cuda" else sk
    bias = torch.zeros(sq, width, dtype=q.dtype, device=q.device)[:, :sk]
    return bias.masked_fill_(~mask.to(q.device), float("-inf"))


class SdpaBackend:
    name = "sdpa"
    supports_mask = True
    supports_softcap = False  # the fused ops have no score hook; softcap goes to ``math``
    supports_window = True  # as a bias
    supports_varlen = True  # one call per sequence

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
        if segments is not None:
            return forward_segments(self.forward, q, k, v, segments, causal=causal, scale=scale,
                                    mask=mask, window=window)
        groups = q.shape[2] // k.shape[2]
        qt, kt, vt = _bhsd(q), _bhsd(repeat_kv(k, groups)), _bhsd(repeat_kv(v, groups))
        bias = _additive(mask, q, k, window)
        if q.device.type == "cpu":
            out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                qt, kt, vt, 0.0, causal, attn_mask=bias, scale=scale
            )
        else:
            bias = None if bias is None else bias.expand(q.shape[0], q.shape[2], *bias.shape)
            out, lse, _, _ = torch.ops.aten._scaled_dot_product_efficient_attention(
                qt, kt, vt, bias, True, 0.0, causal, scale=scale
            )
            lse = lse[..., : q.shape[1]]
        return _bhsd(out), lse

    def backward(self, dout, q, k, v, out, lse, *, causal, scale, mask=None, softcap=None,
                 window=None, segments=None, cu_seqlens=None):
        assert softcap is None, "sdpa has no softcap (get_backend routes softcap elsewhere)"
        if segments is not None:
            return backward_segments(self.backward, dout, q, k, v, out, lse, segments,
                                     causal=causal, scale=scale, mask=mask, window=window)
        groups = q.shape[2] // k.shape[2]
        qt, kt, vt = _bhsd(q), _bhsd(repeat_kv(k, groups)), _bhsd(repeat_kv(v, groups))
        dout_t, out_t = _bhsd(dout.to(q.dtype)), _bhsd(out.to(q.dtype))
        bias = _additive(mask, q, k, window)
        if q.device.type == "cpu":
            dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
                dout_t, qt, kt, vt, out_t, lse.contiguous(), 0.0, causal, attn_mask=bias, scale=scale
            )
        else:
            sq = q.shape[1]
            padded = -(-sq // _CUDA_LSE_ALIGN) * _CUDA_LSE_ALIGN
            lse_p = torch.nn.functional.pad(lse, (0, padded - sq)).contiguous()
            seed = torch.zeros((), dtype=torch.int64, device=q.device)
            bias = None if bias is None else bias.expand(q.shape[0], q.shape[2], *bias.shape)
            dq, dk, dv, _ = torch.ops.aten._scaled_dot_product_efficient_attention_backward(
                dout_t, qt, kt, vt, bias, out_t, lse_p, seed, seed, 0.0,
                [True, True, True, False], causal, scale=scale,
            )
        return _bhsd(dq), sum_kv_groups(_bhsd(dk), groups), sum_kv_groups(_bhsd(dv), groups)
