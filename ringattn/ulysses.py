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

Any head count (``ringattn.headsplit``): ranks get ceil(h/u) or floor(h/u) query heads and
the contiguous range of K/V heads those use, through one all-to-all of uneven split sizes
per tensor. Uneven sizes rather than padding heads: every head moves exactly once (the
bytes of an even split; padding would move and allocate ceil(h/u) * u heads). A K/V head
that serves query heads on two ranks is sent to both; its gradients come back summed.
When a rank's query heads do not use its K/V heads in equal contiguous groups (28 heads /
4 K/V heads at u = 8), the K/V heads are expanded locally, on that rank, to one per query
head (memory on the rank, no extra communication).

Sinks (GPT-OSS): each rank folds in the sinks of its own heads, once, after its whole
row is computed (``merge.add_sinks``); softcap goes to the kernel (``kernels``).
"""
from __future__ import annotations

import torch

from . import profile
from .blocks import accumulate_grads, attend_blocks, backward_inputs, record_step
from .comm import group_rank, heads_to_sequence, sequence_to_heads
from .headsplit import HeadSplit
from .kernels import choice, get_backend
from .kernels.base import accumulation_dtype
from .layouts import ALL
from .merge import PartialAttention, add_sinks, sinks_grad
from .plan import prologue


def local_forward(q, k, v, sinks, scale, tasks, backend, softcap):
    """``tasks`` over q/k/v of the whole sequence -> (out in q's dtype, fp32 lse, sinks
    folded in once). With plain masks that is one kernel call; documents/windows refine it
    into tiles exactly as the ring does for one of its blocks."""
    kernel = get_backend(backend, q, softcap=softcap)
    record_step(tasks, q, k)
    if (len(tasks) == 1 and tasks[0].kind in ("full", "causal")
            and tasks[0].q_rows == tasks[0].k_rows == ALL):
        # One call covers every row: no merge, no fp32 accumulator to hold.
        choice.note(kernel.name, tasks[0].kind)
        if profile.active() is not None:
            profile.active().count_block(kernel.name, tasks[0].kind)
        out, lse = kernel.forward(q, k, v, causal=tasks[0].causal, scale=scale, softcap=softcap)
    else:
        acc = PartialAttention(q, accumulation_dtype(q.dtype), v.shape[-1])
        attend_blocks(kernel, tasks, q, k, v, scale, acc, softcap)
        out, lse = acc.out, acc.lse
    if sinks is not None:
        out, lse = add_sinks(out, lse.to(accumulation_dtype(q.dtype)), sinks)
    return out.to(q.dtype), lse


class _LocalAttention(torch.autograd.Function):
    """The whole sequence on one rank: ``tasks`` over q/k/v in position order
    (``local_forward``); ``sinks`` (heads,) or None. out in q's dtype, lse fp32 (including
    the sinks)."""

    @staticmethod
    def forward(ctx, q, k, v, sinks, scale, tasks, backend, softcap):
        out, lse = local_forward(q, k, v, sinks, scale, tasks, backend, softcap)
        ctx.save_for_backward(q, k, v, out, lse, sinks)
        ctx.set_materialize_grads(False)
        ctx.scale, ctx.tasks, ctx.backend, ctx.softcap = scale, tasks, backend, softcap
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        dout, (q, k, v, out, lse, sinks) = backward_inputs(ctx, dout, dlse, "ulysses_attention")
        kernel = get_backend(ctx.backend, q, softcap=ctx.softcap)
        acc_dtype = accumulation_dtype(q.dtype)
        dq, dk, dv = (torch.zeros(t.shape, dtype=acc_dtype, device=t.device) for t in (q, k, v))
        accumulate_grads(kernel, ctx.tasks, dout, q, k, v, out, lse, ctx.scale, dq, dk, dv,
                         ctx.softcap)
        dsinks = None if sinks is None else sinks_grad(dout, out, lse, sinks)
        return (dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dsinks, None, None, None, None)


def local_attention(q, k, v, *, causal=False, softmax_scale=None, backend="auto",
                    return_lse=False, cu_seqlens=None, window_size=(-1, -1), dropout_p=0.0,
                    sinks=None, softcap=None, plan=None, mask=None):
    """Attention of whole sequences in one process, no communication: the library's
    block-classified path (documents and windows cost their visible blocks, never a dense
    s x s mask). Same arguments as ``ring_attention``; ``plan`` from a one-process
    ``SequenceParallel.prepare`` (or None: made here)."""
    plan, scale, _ = prologue("local attention", q, k, v, strategy="local", layout="contiguous",
                              causal=causal, window_size=window_size, cu_seqlens=cu_seqlens,
                              dropout_p=dropout_p, backend=backend, softmax_scale=softmax_scale,
                              plan=plan, sinks=sinks, softcap=softcap, mask=mask)
    out, lse = _LocalAttention.apply(q, k, v, sinks, scale,
                                     plan.local_tasks(causal, window_size, mask), backend, softcap)
    return (out, lse) if return_lse else out


def heads_to_ranks(q, k, v, group, split: HeadSplit, kv_index=None):
    """(b, s/u, h, d) shards -> this rank's query heads ``split.q[r]`` (b, s, n_r, d) and the
    K/V heads they use (rank-major token order), K/V expanded locally to one per query head
    where the split's GQA groups are not equal (``HeadSplit.kv_index``; ``kv_index``: that
    index already on the device, e.g. ``AttentionPlan.kv_index``)."""
    qh = heads_to_sequence(q, split.q, group)
    kh, vh = (heads_to_sequence(t, split.kv, group) for t in (k, v))
    if kv_index is None:
        index = split.kv_index(group_rank(group))
        kv_index = None if index is None else torch.tensor(index, device=kh.device)
    if kv_index is not None:
        kh, vh = kh.index_select(2, kv_index), vh.index_select(2, kv_index)
    return qh, kh, vh


def sequence_to_ranks(out, lse, group, split: HeadSplit):
    """Inverse of ``heads_to_ranks`` for out (b, s, n_r, d) and lse (b, n_r, s) or None."""
    out = sequence_to_heads(out, split.q, group)
    if lse is not None:
        lse = sequence_to_heads(lse.transpose(1, 2).unsqueeze(-1), split.q, group)
        lse = lse.squeeze(-1).transpose(1, 2)
    return out, lse


def rank_sinks(sinks, group, split: HeadSplit):
    """The sinks of this rank's query heads (a differentiable slice), or None."""
    if sinks is None:
        return None
    lo, hi = split.q[group_rank(group)]
    return sinks[lo:hi]


def ulysses_attention(q, k, v, *, causal=False, softmax_scale=None, layout="zigzag", group=None,
                      backend="auto", return_lse=False, cu_seqlens=None, window_size=(-1, -1),
                      dropout_p=0.0, sinks=None, softcap=None, plan=None, mask=None):
    """Exact attention of this rank's query shard over the whole sharded sequence.

    Same contract as ``ring_attention`` (shapes, layout, return_lse, cu_seqlens,
    window_size, sinks, softcap, plan, mask), for any head count >= u, where u is the size of
    ``group`` (default: the world); see ``ringattn.headsplit``.
    """
    plan, scale, split = prologue("Ulysses attention", q, k, v, strategy="ulysses",
                                  layout=layout, causal=causal, window_size=window_size,
                                  cu_seqlens=cu_seqlens, dropout_p=dropout_p, backend=backend,
                                  softmax_scale=softmax_scale, plan=plan, sinks=sinks,
                                  softcap=softcap, ulysses_group=group, mask=mask)
    rank = group_rank(group)
    qh, kh, vh = heads_to_ranks(q, k, v, group, split, plan.kv_index(split, rank))
    order = plan.gathered_order(causal, window_size, mask)
    if order is not None:  # rank-major order -> position order
        held, order = order
        qh, kh, vh = (t.index_select(1, order) for t in (qh, kh, vh))
    out, lse = _LocalAttention.apply(qh, kh, vh, rank_sinks(sinks, group, split), scale,
                                     plan.local_tasks(causal, window_size, mask), backend, softcap)
    lse = lse if return_lse else None  # skip its all-to-all when nobody wants it
    if order is not None:  # position order -> rank-major order
        out = out.index_select(1, held)
        lse = lse.index_select(2, held) if lse is not None else None
    out, lse = sequence_to_ranks(out, lse, group, split)
    return (out, lse) if return_lse else out


__all__ = ["ulysses_attention", "local_attention", "heads_to_ranks", "sequence_to_ranks",
           "rank_sinks"]
