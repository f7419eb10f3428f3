"""``SequenceParallel``: the one front door models use for sequence-parallel attention."""
from __future__ import annotations

from . import sharding
from .comm import group_rank, group_size
from .layouts import get_layout
from .ring import ring_attention

STRATEGIES = ("ring",)


class SequenceParallel:
    """Holds the sequence-parallel group and layout; shards data and runs attention.

    strategy: "ring". layout: "zigzag" | "striped" | "contiguous". group: the process
    group whose ranks share one sequence (default: the world). backend: kernel backend.
    """

    def __init__(self, strategy: str = "ring", layout: str = "zigzag", group=None,
                 backend: str = "auto"):
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {strategy!r}; choose one of {list(STRATEGIES)}")
        get_layout(layout)
        self.strategy, self.layout, self.group, self.backend = strategy, layout, group, backend

    @property
    def world_size(self) -> int:
        return group_size(self.group)

    @property
    def rank(self) -> int:
        return group_rank(self.group)

    def attention(self, q, k, v, *, causal: bool = True, softmax_scale=None):
        """q (b, s_local, h, d), k/v (b, s_local, h_kv, d) -> (b, s_local, h, d)."""
        return ring_attention(q, k, v, causal=causal, softmax_scale=softmax_scale,
                              layout=self.layout, group=self.group, backend=self.backend)

    def shard(self, x, dim: int = 1):
        return sharding.shard(x, layout=self.layout, group=self.group, dim=dim)

    def unshard(self, x, dim: int = 1):
        return sharding.unshard(x, layout=self.layout, group=self.group, dim=dim)

    def positions(self, seqlen: int, device=None):
        return sharding.positions(seqlen, layout=self.layout, group=self.group, device=device)

    def __repr__(self):
        return (f"SequenceParallel(strategy={self.strategy!r}, layout={self.layout!r}, "
                f"world_size={self.world_size}, backend={self.backend!r})")
