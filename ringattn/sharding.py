"""Full tensor <-> this rank's shard, in a layout's token order.

Ring and Ulysses: the layout splits the sequence over the P ranks of the group.
Hybrid (``ulysses_size`` = u > 1): the group's P ranks form P/u ring positions of u
consecutive ranks; the layout splits the sequence over the ring positions, and each ring
position's shard is split contiguously among its u ranks (rank = ring_pos * u + a holds
the a-th 1/u of ring position ring_pos's tokens). The Ulysses all-to-all inside a ring
position then concatenates exactly the layout's shard, in increasing position order.

Layouts that place tokens by document (``doc_zigzag``) need ``cu_seqlens``, the int32
document boundaries of the full sequence; every function here takes it.
"""
from __future__ import annotations

import torch

from .comm import gather_sequence, group_rank, group_size
from .layouts import get_layout
from .masking import AttentionMask


def check_seqlen(layout: str, seqlen: int, world_size: int, ulysses_size: int = 1,
                 cu_seqlens=None) -> None:
    """ValueError unless ``seqlen`` splits over ``world_size`` ranks (two levels for hybrid)
    and ``cu_seqlens``, if given or needed by the layout, are valid for it."""
    ring = world_size // ulysses_size
    lay = get_layout(layout)
    lay.check_documents(cu_seqlens)
    if cu_seqlens is not None:
        AttentionMask.build(seqlen, False, cu_seqlens)  # validates them
    lay.check_seqlen(seqlen, ring)
    if (seqlen // ring) % ulysses_size:
        raise ValueError(
            f"hybrid sharding: each of the {ring} ring shards ({seqlen // ring} tokens) must "
            f"split evenly over ulysses_size={ulysses_size} ranks; sequence length {seqlen} "
            f"must be a multiple of {ring * ulysses_size} (and of what layout {layout!r} needs)"
        )


def held_indices(layout: str, seqlen: int, world_size: int, rank: int,
                 ulysses_size: int = 1, cu_seqlens=None) -> torch.Tensor:
    """Global positions held by ``rank`` of ``world_size``, increasing (see the module doc)."""
    ring = world_size // ulysses_size
    ring_shard = get_layout(layout).indices(seqlen, ring, rank // ulysses_size, cu_seqlens)
    return ring_shard.view(ulysses_size, -1)[rank % ulysses_size]


def positions(seqlen: int, *, layout: str = "zigzag", group=None, device=None,
              ulysses_size: int = 1, cu_seqlens=None) -> torch.Tensor:
    """Global positions (LongTensor of seqlen / P) of the tokens this rank holds, increasing."""
    p = group_size(group)
    check_seqlen(layout, seqlen, p, ulysses_size, cu_seqlens)
    return held_indices(layout, seqlen, p, group_rank(group), ulysses_size, cu_seqlens).to(device)


def shard(x: torch.Tensor, *, layout: str = "zigzag", group=None, dim: int = 1,
          ulysses_size: int = 1, cu_seqlens=None) -> torch.Tensor:
    """The same full tensor on every rank (s along ``dim``, any dtype) -> this rank's shard
    (s/P along ``dim``, in ``layout`` order, a copy)."""
    idx = positions(x.shape[dim], layout=layout, group=group, device=x.device,
                    ulysses_size=ulysses_size, cu_seqlens=cu_seqlens)
    return x.index_select(dim, idx)


def unshard(x_local: torch.Tensor, *, layout: str = "zigzag", group=None, dim: int = 1,
            ulysses_size: int = 1, cu_seqlens=None) -> torch.Tensor:
    """Every rank's shard -> the full tensor on every rank (all-gather, differentiable).

    Backward: each shard receives the sum over ranks of the gradient of the full tensor.
    """
    p = group_size(group)
    if p == 1:
        get_layout(layout).check_documents(cu_seqlens)
        return x_local
    seqlen = x_local.shape[dim] * p
    check_seqlen(layout, seqlen, p, ulysses_size, cu_seqlens)
    gathered = gather_sequence(x_local, dim, group)  # rank-major order
    held = torch.cat([held_indices(layout, seqlen, p, r, ulysses_size, cu_seqlens) for r in range(p)])
    # gathered[i] holds position held[i]; argsort puts positions back in order.
    return gathered.index_select(dim, torch.argsort(held).to(x_local.device))
