"""All-gather attention (Llama 3 style context parallelism): gather K/V, attend locally.

Each of the P ranks keeps its query shard (any layout) and all-gathers the K/V shards of
the whole sequence, once per call, in one collective (K and V concatenated per token,
whatever their head sizes (MLA's v is narrower than its k), so only the K/V heads travel:
with grouped-query attention that is a fraction of the query bytes). The gathered K/V are
put in position order (one index_select, from the layout's runs; striped shards stay in
rank order), so its queries attend to one sequence in a few varlen calls
(``AttentionPlan.allgather_tasks``): any mask the ring takes (causal, documents, windows,
``RangeMask``) works unchanged, blocks a mask leaves empty are skipped, and fully hidden
rows get out 0 and lse -inf. Backward is composed: the local attention's exact backward,
block by block, gives fp32 dK/dV of the whole sequence, which are reduce-scattered (summed)
to the ranks that own them.

Only this rank's K/V shard is saved for backward; backward gathers the sequence's K/V again.
So nothing the size of the whole sequence stays between a layer's forward and its backward
(without activation checkpointing every layer would otherwise keep 2 * S * kv_heads *
head_dim elements until its backward). The price is one more all-gather per layer in
backward, the bytes the ring's backward passes its K/V with: with or without
checkpointing, all-gather and ring send the same K/V bytes per layer.

Trade-off against the ring: no P-step pipeline to overlap (one collective, then compute),
and the full K/V of the sequence plus, in backward, its fp32 gradients live on every rank
while one layer runs; the ring holds two shards at a time. With few K/V heads and moderate
S that memory is small, and the single collective is simple and fast.
"""
from __future__ import annotations

import torch

from .blocks import accumulate_grads, backward_inputs
from .comm import all_gather_sequence, reduce_scatter_sequence
from .kernels import get_backend
from .kernels.base import accumulation_dtype
from .merge import sinks_grad
from .plan import prologue
from .ulysses import local_forward


def _gathered(k, v, order, group):
    """The whole sequence's K/V packed per token (b, S, h_kv * (d_k + d_v)), in position
    order where ``order`` says (``_split`` views it as K and V)."""
    kv = all_gather_sequence(torch.cat([k.flatten(2), v.flatten(2)], dim=2), 1, group)  # rank-major
    return kv if order is None else kv.index_select(1, order)


def _split(kv, k, v):
    """Views of packed K/V (or their gradients) ``kv`` (b, S, h_kv * (d_k + d_v)) as
    (b, S, h_kv, d_k) and (b, S, h_kv, d_v), shaped after the local shards k and v."""
    b, s = kv.shape[:2]
    cut = k.shape[2] * k.shape[3]
    return kv[..., :cut].view(b, s, *k.shape[2:]), kv[..., cut:].view(b, s, *v.shape[2:])


class _AllGatherAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, sinks, scale, tasks, order, group, backend, softcap):
        kv = _gathered(k, v, order, group)
        out, lse = local_forward(q, *_split(kv, k, v), sinks, scale, tasks, backend, softcap)
        ctx.save_for_backward(q, k, v, out, lse, sinks)  # the local shards only
        ctx.set_materialize_grads(False)
        ctx.scale, ctx.tasks, ctx.order, ctx.group = scale, tasks, order, group
        ctx.backend, ctx.softcap = backend, softcap
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        dout, (q, k, v, out, lse, sinks) = backward_inputs(ctx, dout, dlse, "allgather_attention")
        kv = _gathered(k, v, ctx.order, ctx.group)  # again: it was not kept since forward
        acc_dtype = accumulation_dtype(q.dtype)
        dq = torch.zeros(q.shape, dtype=acc_dtype, device=q.device)
        dkv = torch.zeros(kv.shape, dtype=acc_dtype, device=kv.device)
        accumulate_grads(get_backend(ctx.backend, q, softcap=ctx.softcap), ctx.tasks, dout, q,
                         *_split(kv, k, v), out, lse, ctx.scale, dq, *_split(dkv, k, v),
                         ctx.softcap)
        del kv
        if ctx.order is not None:  # position order -> rank-major, then to the owners
            ranked = torch.empty_like(dkv)
            ranked[:, ctx.order] = dkv
            dkv = ranked
        dkv = reduce_scatter_sequence(dkv, 1, ctx.group)  # fp32, summed over ranks
        dsinks = None if sinks is None else sinks_grad(dout, out, lse, sinks)
        dk, dv = _split(dkv, k, v)
        return (dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype),
                dsinks, None, None, None, None, None, None)


def allgather_attention(q, k, v, *, causal=False, softmax_scale=None, layout="zigzag", group=None,
                        backend="auto", return_lse=False, cu_seqlens=None, window_size=(-1, -1),
                        dropout_p=0.0, sinks=None, softcap=None, plan=None, mask=None):
    """Exact attention of this rank's query shard over the whole sharded sequence, by
    all-gathering K/V (see the module doc). Same contract as ``ring_attention``."""
    plan, scale, _ = prologue("all-gather attention", q, k, v, strategy="allgather",
                              layout=layout, causal=causal, window_size=window_size,
                              cu_seqlens=cu_seqlens, dropout_p=dropout_p, backend=backend,
                              softmax_scale=softmax_scale, plan=plan, sinks=sinks,
                              softcap=softcap, ring_group=group, mask=mask)
    out, lse = _AllGatherAttention.apply(q, k, v, sinks, scale,
                                         plan.allgather_tasks(causal, window_size, mask),
                                         plan.allgather_order(), group, backend, softcap)
    return (out, lse) if return_lse else out


__all__ = ["allgather_attention"]
