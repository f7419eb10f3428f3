"""Float64, single-process, full-sequence attention: the ground truth for every test.

Written independently of ringattn: an explicit mask matrix and softmax, GQA through
repeat_interleave, gradients by autograd.
"""
from __future__ import annotations

import math

import torch


def reference_attention(q, k, v, dout, *, causal, scale=None, mask=None):
    """Full tensors (b, s, h, d) / (b, s, h_kv, d) -> float64 out, lse (b, h, s), dq, dk, dv.

    ``mask``: optional bool (s, s), True = visible; combined with ``causal``.
    """
    q, k, v = (t.detach().double().requires_grad_() for t in (q, k, v))
    scale = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    g = q.shape[2] // k.shape[2]
    kr, vr = k.repeat_interleave(g, dim=2), v.repeat_interleave(g, dim=2)
    s = torch.einsum("bqhd,bkhd->bhqk", q, kr) * scale
    sq, sk = q.shape[1], k.shape[1]
    visible = torch.ones(sq, sk, dtype=torch.bool)
    if causal:
        visible &= torch.ones(sq, sk, dtype=torch.bool).tril()
    if mask is not None:
        visible &= mask
    s = s.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    out = torch.einsum("bhqk,bkhd->bqhd", torch.softmax(s, dim=-1), vr)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), dout.double())
    return out.detach(), lse.detach(), dq, dk, dv


def layout_indices(layout: str, seqlen: int, world_size: int, rank: int) -> torch.Tensor:
    """The layouts' definitions, restated independently of ringattn.layouts."""
    if layout == "contiguous":
        return torch.arange(seqlen).view(world_size, -1)[rank]
    if layout == "zigzag":
        chunks = torch.arange(seqlen).view(2 * world_size, -1)
        return torch.cat([chunks[rank], chunks[2 * world_size - 1 - rank]])
    if layout == "striped":
        return torch.arange(seqlen).view(-1, world_size)[:, rank]
    raise ValueError(layout)


def rel_err(got, want) -> float:
    """max |got - want| / max |want|; the absolute error where the reference is exactly
    zero (e.g. dq when every query sees only itself: a one-key softmax has no gradient)."""
    scale = want.abs().max()
    return ((got.double() - want).abs().max() / (scale if scale > 0 else 1.0)).item()


def rms_err(got, want) -> float:
    return ((got.double() - want).pow(2).mean().sqrt() / want.pow(2).mean().sqrt()).item()
