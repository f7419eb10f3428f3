"""Ulysses attention: trade sequence shards for head shards, attend locally, trade back.

Each of the u ranks holds its layout shard of the sequence with all heads. One
all-to-all per tensor (scatter heads, gather sequence) gives every rank the whole
sequence for heads/u query heads and their K/V heads; local attention over it (one kernel
call unless documents/windows cut it into tiles); one all-to-all (scatter sequence,
gather heads) returns the output shard. Backward is composed: the all-to-all's backward
is the reverse all-to-all, and ``_LocalAttention`` wraps the kernels' exact backward.

Causal (or documents/windows) with zigzag/striped: the gathered sequence is rank-major
(rank 0's tokens, then rank 1's, ...), not in position order. We permute it into
position order with one index_select before the kernel and back after, rather than
running the layout's block structure: the permutation moves O(S*h*d/u) bytes while
attention costs O(S^2*h*d/u), and a single full causal kernel call is the fastest thing
every backend does (the block structure would need ~u^2 smaller calls and merges).
Contiguous needs no permutation, and neither does plain non-causal attention (it does
not care about key order).

GQA: with kv_heads >= u each rank gets kv_heads/u K/V heads. With kv_heads < u (and
u % kv_heads == 0) each K/V head is replicated u/kv_heads times before the all-to-all, so
each rank receives exactly the one K/V head its query heads use; the replication is
``repeat_interleave``, whose backward sums the replicas' gradients.
"""
from __future__ import annotations

import math

import torch

from .comm import all_to_all, group_size
from .inputs import check_qkv, check_same_on_all_ranks, check_ulysses_heads
from .kernels import get_backend
from .kernels.base import accumulation_dtype
from .layouts import ALL, BlockTask, get_layout
from .masking import AttentionMask
from .merge import PartialAttention
from .blocks import attend_blocks, backward_inputs, block_grads, record_step


class _LocalAttention(torch.autograd.Function):
    """The whole sequence on one rank: ``tasks`` over q/k/v in position order.

    With plain masks that is one kernel call; documents/windows refine it into tiles
    exactly as the ring does for one of its blocks. out in q's dtype, lse fp32.
    """

    @staticmethod
    def forward(ctx, q, k, v, scale, tasks, backend):
        kernel = get_backend(backend, q)
        record_step(tasks, q, k)
        if len(tasks) == 1 and tasks[0].mask is None and tasks[0].q_rows == tasks[0].k_rows == ALL:
            # One call covers every row: no merge, no fp32 accumulator to hold.
            out, lse = kernel.forward(q, k, v, causal=tasks[0].causal, scale=scale)
        else:
            acc = PartialAttention(q, accumulation_dtype(q.dtype))
            attend_blocks(kernel, tasks, q, k, v, scale, acc)
            out, lse = acc.out, acc.lse
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.set_materialize_grads(False)
        ctx.scale, ctx.tasks, ctx.backend = scale, tasks, backend
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        dout, q, k, v, out, lse = backward_inputs(ctx, dout, dlse, "ulysses_attention")
        kernel = get_backend(ctx.backend, q)
        acc_dtype = accumulation_dtype(q.dtype)
        dq, dk, dv = (torch.zeros(t.shape, dtype=acc_dtype, device=t.device) for t in (q, k, v))
        for t, (dq_b, dk_b, dv_b) in block_grads(kernel, ctx.tasks, dout, q, k, v, out, lse, ctx.scale):
            dq[:, t.q_rows] += dq_b
            dk[:, t.k_rows] += dk_b
            dv[:, t.k_rows] += dv_b
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None


def local_attention(q, k, v, *, mask: AttentionMask, scale, backend="auto", return_lse=False):
    """Differentiable attention of whole, position-ordered tensors (no communication)."""
    tasks = [BlockTask(ALL, ALL, mask.causal)]
    if not mask.is_plain:
        pos = torch.arange(mask.seqlen)
        tasks = mask.refine(tasks[0], pos, pos)
    out, lse = _LocalAttention.apply(q, k, v, scale, tasks, backend)
    return (out, lse) if return_lse else out


def heads_to_ranks(q, k, v, group):
    """(b, s/u, h, d) shards -> (b, s, h/u, d) head shards (rank-major token order)."""
    u, kv_heads = group_size(group), k.shape[2]
    if kv_heads < u:  # replicate only up to u heads: each rank then gets one K/V head
        k, v = (t.repeat_interleave(u // kv_heads, dim=2) for t in (k, v))
    return tuple(all_to_all(t, scatter_dim=2, gather_dim=1, group=group) for t in (q, k, v))


def sequence_to_ranks(out, lse, group):
    """Inverse of ``heads_to_ranks`` for out (b, s, h/u, d) and lse (b, h/u, s) or None."""
    out = all_to_all(out, scatter_dim=1, gather_dim=2, group=group)
    if lse is not None:
        lse = all_to_all(lse, scatter_dim=2, gather_dim=1, group=group)
    return out, lse


def ulysses_attention(q, k, v, *, causal=False, softmax_scale=None, layout="zigzag", group=None,
                      backend="auto", return_lse=False, cu_seqlens=None, window_size=(-1, -1),
                      dropout_p=0.0):
    """Exact attention of this rank's query shard over the whole sharded sequence.

    Same contract as ``ring_attention`` (shapes, layout, return_lse, cu_seqlens,
    window_size), with the additional requirements heads % u == 0 and kv_heads dividing
    u or a multiple of it, where u is the size of ``group`` (default: the world).
    """
    check_qkv(q, k, v, dropout_p)
    lay = get_layout(layout)
    if q.shape[1] != k.shape[1]:
        raise ValueError(
            f"Ulysses attention needs equal local q and k/v lengths; got {q.shape[1]} and {k.shape[1]}"
        )
    u = group_size(group)
    check_ulysses_heads(q.shape[2], k.shape[2], u)
    seqlen = q.shape[1] * u
    lay.check_seqlen(seqlen, u)
    if cu_seqlens is not None and q.shape[0] != 1:
        raise ValueError(f"cu_seqlens (packed documents) needs batch size 1; got {q.shape[0]}")
    mask = AttentionMask.build(seqlen, causal, cu_seqlens, window_size)
    get_backend(backend, q)  # fail early, before any communication, if it cannot run
    check_same_on_all_ranks(q, k, group, cu_seqlens)
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])

    qh, kh, vh = heads_to_ranks(q, k, v, group)
    held = None  # held[i]: the position of gathered token i
    if (causal or not mask.is_plain) and u > 1 and lay.name != "contiguous":
        held = torch.cat([lay.indices(seqlen, u, r) for r in range(u)]).to(q.device)
        order = torch.argsort(held)
        qh, kh, vh = (t.index_select(1, order) for t in (qh, kh, vh))
    out, lse = local_attention(qh, kh, vh, mask=mask, scale=scale, backend=backend,
                               return_lse=True)
    lse = lse if return_lse else None  # skip its all-to-all when nobody wants it
    if held is not None:  # position order -> rank-major order
        out = out.index_select(1, held)
        lse = lse.index_select(2, held) if lse is not None else None
    out, lse = sequence_to_ranks(out, lse, group)
    return (out, lse) if return_lse else out


__all__ = ["ulysses_attention", "local_attention", "heads_to_ranks", "sequence_to_ranks"]
