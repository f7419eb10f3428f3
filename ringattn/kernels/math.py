"""Plain-PyTorch attention kernel: any device, any dtype, fp32 accumulation.

It is the reference the fused backends are tested against, and the fallback where no
fused kernel fits. Memory is O(q_len * k_len) per head: fine for blocks, not for whole
long sequences.
"""
from __future__ import annotations

import torch

from .base import accumulation_dtype


def _scores(q, k, scale, causal, mask=None):
    """fp32 (or fp64) scores (b, kv_heads, groups, q_len, k_len); GQA without repeating k."""
    b, sq, h, d = q.shape
    hk = k.shape[2]
    acc = accumulation_dtype(q.dtype)
    qg = q.to(acc).view(b, sq, hk, h // hk, d)
    s = torch.einsum("bqhgd,bkhd->bhgqk", qg, k.to(acc)) * scale
    if causal:
        sk = k.shape[1]
        hidden = torch.ones(sq, sk, dtype=torch.bool, device=q.device).triu(1)
        s = s.masked_fill(hidden, float("-inf"))
    if mask is not None:
        s = s.masked_fill(~mask.to(s.device), float("-inf"))
    return s


class MathBackend:
    name = "math"
    supports_mask = True

    def supports(self, q):
        return None

    def forward(self, q, k, v, *, causal, scale, mask=None):
        b, sq, h, d = q.shape
        s = _scores(q, k, scale, causal, mask)
        lse = torch.logsumexp(s, dim=-1)
        # softmax subtracts the row max before exp: exact even when |logits| is so large
        # that the fp32 lse itself is coarse. A row with no visible key gets p = 0, not NaN.
        p = torch.softmax(s, dim=-1).masked_fill(torch.isneginf(lse).unsqueeze(-1), 0.0)
        out = torch.einsum("bhgqk,bkhd->bqhgd", p, v.to(p.dtype)).reshape(b, sq, h, d)
        return out, lse.reshape(b, h, sq)

    def backward(self, dout, q, k, v, out, lse, *, causal, scale, mask=None):
        b, sq, h, d = q.shape
        hk = k.shape[2]
        g = h // hk
        acc = accumulation_dtype(q.dtype)
        s = _scores(q, k, scale, causal, mask)
        lse = lse.to(acc).view(b, hk, g, sq)
        # A row with no visible key has lse = -inf; keep its probabilities at 0, not NaN.
        lse_safe = torch.where(torch.isneginf(lse), torch.zeros_like(lse), lse)
        p = torch.exp(s - lse_safe.unsqueeze(-1))
        do = dout.to(acc).view(b, sq, hk, g, d)
        # D = rowsum(dO * O) over the *final* output: the softmax Jacobian of the whole row.
        delta = (do * out.to(acc).view(b, sq, hk, g, d)).sum(-1).permute(0, 2, 3, 1)
        dv = torch.einsum("bhgqk,bqhgd->bkhd", p, do)
        dp = torch.einsum("bqhgd,bkhd->bhgqk", do, v.to(acc))
        ds = p * (dp - delta.unsqueeze(-1)) * scale
        dq = torch.einsum("bhgqk,bkhd->bqhgd", ds, k.to(acc)).reshape(b, sq, h, d)
        dk = torch.einsum("bhgqk,bqhgd->bkhd", ds, q.to(acc).view(b, sq, hk, g, d))
        return dq, dk, dv
