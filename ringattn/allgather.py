"""All-gather attention (Llama 3 style context parallelism): gather K/V, attend locally.

Each of the P ranks keeps its query shard (any layout) and all-gathers the K/V shards of
the whole sequence, once per call, in one collective (K and V concatenated along heads, so
only the K/V heads travel: with grouped-query attention that is a fraction of the query
bytes). The gathered K/V are put in position order (one index_select, from the layout's
runs; striped shards stay in rank order), so its queries attend to one sequence in a few
varlen calls (``AttentionPlan.allgather_tasks``): any mask the ring takes
(causal, documents, windows, ``RangeMask``) works unchanged, blocks a mask leaves empty are
skipped, and fully hidden rows get out 0 and lse -inf. Backward is composed: the local
attention's exact backward gives dK/dV of the whole sequence, which the all-gather's
backward reduce-scatters (sums) to the ranks that own them.

Trade-off against the ring: no P-step pipeline to overlap (one collective, then compute),
and the full K/V of the sequence (2 * S * kv_heads * head_dim elements) plus its gradients
live on every rank during the layer; the ring holds two shards at a time. With few K/V
heads and moderate S that memory is small, and the single collective is simple and fast.
"""
from __future__ import annotations

import torch

from .comm import gather_sequence
from .plan import prologue
from .ulysses import _LocalAttention


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
    heads = k.shape[2]
    kv = gather_sequence(torch.cat([k, v], dim=2), dim=1, group=group)  # (b, S, 2 h_kv, d)
    order = plan.allgather_order()
    if order is not None:  # position order: one sequence, a few varlen calls (autograd: scatter)
        kv = kv.index_select(1, order)
    kf, vf = kv[:, :, :heads], kv[:, :, heads:]
    out, lse = _LocalAttention.apply(q, kf, vf, sinks, scale,
                                     plan.allgather_tasks(causal, window_size, mask), backend,
                                     softcap)
    return (out, lse) if return_lse else out


__all__ = ["allgather_attention"]
