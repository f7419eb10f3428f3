"""Hybrid (USP) attention: Ulysses inside each ring position, ring attention across them.

The sequence-parallel group of P = r * u ranks is r ring positions of u consecutive
ranks (intra-node: the all-to-all is the bandwidth-hungry part) and u rings of r
strided ranks (inter-node: ring transfers overlap compute). The layout applies to the
ring: it splits the sequence over the r ring positions, and each ring position's shard is
split contiguously among its u ranks (``ringattn.sharding``). Ulysses' all-to-all over the
u ranks therefore reassembles exactly the layout's ring shard, in order, for heads/u
heads; ring attention over the r ranks holding the same heads does the rest with the
layout's own causal block structure, and the reverse all-to-all returns each rank's
shard with all heads. Backward is composed from the all-to-all's and the ring's.
Any head count (Ulysses' uneven head split); each ring gets the sinks of its heads.
"""
from __future__ import annotations

from .comm import group_size
from .inputs import check_qkv, check_same_on_all_ranks, check_sinks, check_ulysses_heads
from .kernels import get_backend
from .masking import AttentionMask
from .ring import ring_attention
from .sharding import check_seqlen
from .ulysses import heads_to_ranks, rank_sinks, sequence_to_ranks


def hybrid_attention(q, k, v, *, causal=False, softmax_scale=None, layout="zigzag",
                     ring_group=None, ulysses_group=None, backend="auto", return_lse=False,
                     cu_seqlens=None, window_size=(-1, -1), dropout_p=0.0, sinks=None,
                     softcap=None):
    """Exact attention of this rank's query shard over the whole sharded sequence.

    ``ulysses_group``: the u consecutive ranks of this ring position; ``ring_group``: the r
    ranks at the same Ulysses index of every ring position. Shards follow the two-level
    layout of ``ringattn.sharding`` (``shard(..., ulysses_size=u)``); otherwise the
    contract is ``ulysses_attention``'s. Documents and windows (``cu_seqlens``,
    ``window_size``) pass to the ring, whose shards are exactly the layout's, as do
    ``softcap`` and this rank's heads' ``sinks``.
    """
    check_qkv(q, k, v, dropout_p)
    check_sinks(sinks, q)
    if q.shape[1] != k.shape[1]:
        raise ValueError(
            f"hybrid attention needs equal local q and k/v lengths; got {q.shape[1]} and {k.shape[1]}"
        )
    u, r = group_size(ulysses_group), group_size(ring_group)
    split = check_ulysses_heads(q.shape[2], k.shape[2], u)
    check_seqlen(layout, q.shape[1] * u * r, u * r, u, cu_seqlens)
    get_backend(backend, q, softcap=softcap)  # fail early, before any communication
    if cu_seqlens is not None and q.shape[0] != 1:
        raise ValueError(f"cu_seqlens (packed documents) needs batch size 1; got {q.shape[0]}")
    AttentionMask.build(q.shape[1] * u * r, causal, cu_seqlens, window_size)  # checks them
    check_same_on_all_ranks(q, k, ulysses_group, cu_seqlens)  # ring_attention: across the ring
    qh, kh, vh = heads_to_ranks(q, k, v, ulysses_group, split)
    out, lse = ring_attention(qh, kh, vh, causal=causal, softmax_scale=softmax_scale,
                              layout=layout, group=ring_group, backend=backend, return_lse=True,
                              cu_seqlens=cu_seqlens, window_size=window_size,
                              sinks=rank_sinks(sinks, ulysses_group, split), softcap=softcap)
    out, lse = sequence_to_ranks(out, lse if return_lse else None, ulysses_group, split)
    return (out, lse) if return_lse else out
