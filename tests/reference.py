"""Float64, single-process, full-sequence attention: the ground truth for every test.

Written independently of ringattn: an explicit mask matrix and softmax, GQA through
repeat_interleave, gradients by autograd.
"""
from __future__ import annotations

import math

import torch


def reference_attention(q, k, v, dout, *, causal, scale=None, mask=None, softcap=None, sinks=None):
    """Full tensors (b, s, h, d) / (b, s, h_kv, d) -> float64 out, lse (b, h, s), dq, dk, dv
    (and dsinks when ``sinks`` is given).

    ``mask``: optional bool (s, s), True = visible; combined with ``causal``. Rows that see
    nothing get out 0, lse -inf and zero gradients.
    ``softcap``: scores -> c * tanh(scores / c) before masking (Gemma 2).
    ``sinks``: (h,) per-head logits joining every row's softmax with no value (GPT-OSS),
    written as GPT-OSS's eager attention does: one more softmax column, dropped after.
    """
    q, k, v = (t.detach().double().requires_grad_() for t in (q, k, v))
    leaves = (q, k, v)
    if sinks is not None:
        sinks = sinks.detach().double().requires_grad_()
        leaves = (*leaves, sinks)
    scale = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    g = q.shape[2] // k.shape[2]
    kr, vr = k.repeat_interleave(g, dim=2), v.repeat_interleave(g, dim=2)
    s = torch.einsum("bqhd,bkhd->bhqk", q, kr) * scale
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    sq, sk = q.shape[1], k.shape[1]
    visible = torch.ones(sq, sk, dtype=torch.bool)
    if causal:
        visible &= torch.ones(sq, sk, dtype=torch.bool).tril()
    if mask is not None:
        visible &= mask
    s = s.masked_fill(~visible, float("-inf"))
    if sinks is not None:
        s = torch.cat([s, sinks.view(1, -1, 1, 1).expand(*s.shape[:3], 1)], dim=-1)
    lse = torch.logsumexp(s, dim=-1)
    # A row that sees no key (and no sink) attends to nothing: out 0, lse -inf, no gradient
    # (flash-attn's convention). Softmax it over zeros, then zero it: no NaN to leak.
    hidden = torch.isneginf(s).all(dim=-1, keepdim=True)
    p = (torch.softmax(s.masked_fill(hidden, 0.0), dim=-1) * ~hidden)[..., :sk]
    out = torch.einsum("bhqk,bkhd->bqhd", p, vr)
    grads = torch.autograd.grad(out, leaves, dout.double())
    return (out.detach(), lse.detach(), *grads)


def layout_indices(layout: str, seqlen: int, world_size: int, rank: int, doc_lengths=None) -> torch.Tensor:
    """The layouts' definitions, restated independently of ringattn.layouts."""
    if layout == "doc_zigzag":
        # each document in 2P chunks of L // 2P tokens; its L % 2P remainder tokens are
        # dealt round-robin over the ranks, continuing from the previous document's deal;
        # a rank's first extra token lengthens its head chunk, a second its tail chunk
        p, start, dealt, held = world_size, 0, 0, []
        for length in doc_lengths:
            c, m = divmod(length, 2 * p)
            extra = [0] * p
            for j in range(m):
                extra[(dealt + j) % p] += 1
            dealt += m
            sizes = [c + (extra[r] >= 1) for r in range(p)] + [c + (extra[p - 1 - i] == 2) for i in range(p)]
            bounds = [start + sum(sizes[:j]) for j in range(2 * p + 1)]
            for chunk in (rank, 2 * p - 1 - rank):
                held += range(bounds[chunk], bounds[chunk + 1])
            start += length
        assert start == seqlen
        return torch.tensor(held, dtype=torch.long)
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
