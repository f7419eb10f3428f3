"""Full tensor <-> this rank's shard, in a layout's token order."""
from __future__ import annotations

import torch

from .comm import gather_sequence, group_rank, group_size
from .layouts import get_layout


def positions(seqlen: int, *, layout: str = "zigzag", group=None, device=None) -> torch.Tensor:
    """Global positions (LongTensor of seqlen / P) of the tokens this rank holds, increasing."""
    lay = get_layout(layout)
    p = group_size(group)
    lay.check_seqlen(seqlen, p)
    return lay.indices(seqlen, p, group_rank(group)).to(device)


def shard(x: torch.Tensor, *, layout: str = "zigzag", group=None, dim: int = 1) -> torch.Tensor:
    """The same full tensor on every rank -> this rank's shard along ``dim`` (a copy)."""
    idx = positions(x.shape[dim], layout=layout, group=group, device=x.device)
    return x.index_select(dim, idx)


def unshard(x_local: torch.Tensor, *, layout: str = "zigzag", group=None, dim: int = 1) -> torch.Tensor:
    """Every rank's shard -> the full tensor on every rank (all-gather, differentiable).

    Backward: each shard receives the sum over ranks of the gradient of the full tensor.
    """
    p = group_size(group)
    if p == 1:
        return x_local
    lay = get_layout(layout)
    seqlen = x_local.shape[dim] * p
    lay.check_seqlen(seqlen, p)
    gathered = gather_sequence(x_local, dim, group)  # rank-major order
    held = torch.cat([lay.indices(seqlen, p, r) for r in range(p)])
    # gathered[i] holds position held[i]; argsort puts positions back in order.
    return gathered.index_select(dim, torch.argsort(held).to(x_local.device))
