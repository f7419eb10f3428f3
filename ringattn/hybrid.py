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

from .comm import group_rank
from .plan import prologue
from .ring import run_ring
from .ulysses import heads_to_ranks, rank_sinks, sequence_to_ranks


def hybrid_attention(q, k, v, *, causal=False, softmax_scale=None, layout="zigzag",
                     ring_group=None, ulysses_group=None, backend="auto", return_lse=False,
                     cu_seqlens=None, window_size=(-1, -1), dropout_p=0.0, sinks=None,
                     softcap=None, plan=None, mask=None):
    """Exact attention of this rank's query shard over the whole sharded sequence.

    ``ulysses_group``: the u consecutive ranks of this ring position; ``ring_group``: the r
    ranks at the same Ulysses index of every ring position. Shards follow the two-level
    layout of ``ringattn.sharding`` (``shard(..., ulysses_size=u)``); otherwise the
    contract is ``ulysses_attention``'s. Documents, windows and range masks (``cu_seqlens``,
    ``window_size``, ``mask``) pass to the ring, whose shards are exactly the layout's, as do
    ``softcap`` and this rank's heads' ``sinks``. Without a ``plan``, the shards are checked
    across both groups (two all-gathers).
    """
    plan, scale, split = prologue("hybrid attention", q, k, v, strategy="hybrid", layout=layout,
                                  causal=causal, window_size=window_size, cu_seqlens=cu_seqlens,
                                  dropout_p=dropout_p, backend=backend,
                                  softmax_scale=softmax_scale, plan=plan, sinks=sinks,
                                  softcap=softcap, ring_group=ring_group,
                                  ulysses_group=ulysses_group, mask=mask)
    kv_index = plan.kv_index(split, group_rank(ulysses_group))
    qh, kh, vh = heads_to_ranks(q, k, v, ulysses_group, split, kv_index)
    out, lse = run_ring(qh, kh, vh, steps=plan.ring_steps(causal, window_size, mask), scale=scale,
                        group=ring_group, backend=backend,
                        sinks=rank_sinks(sinks, ulysses_group, split), softcap=softcap)
    out, lse = sequence_to_ranks(out, lse if return_lse else None, ulysses_group, split)
    return (out, lse) if return_lse else out
