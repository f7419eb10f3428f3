"""``SequenceParallel``: the one front door models use for sequence-parallel attention."""
from __future__ import annotations

from . import sharding
from .comm import group_rank, group_size
from .layouts import get_layout
from .masking import document_positions
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

    def attention(self, q, k, v, *, causal: bool = True, softmax_scale=None, cu_seqlens=None,
                  window_size=(-1, -1)):
        """q (b, s_local, h, d), k/v (b, s_local, h_kv, d) -> (b, s_local, h, d).

        ``cu_seqlens``: int32 document boundaries of the full packed sequence (batch 1);
        ``window_size``: (left, right) sliding window, -1 = unbounded.
        """
        return ring_attention(q, k, v, causal=causal, softmax_scale=softmax_scale,
                              layout=self.layout, group=self.group, backend=self.backend,
                              cu_seqlens=cu_seqlens, window_size=window_size)

    def shard(self, x, dim: int = 1):
        return sharding.shard(x, layout=self.layout, group=self.group, dim=dim)

    def unshard(self, x, dim: int = 1):
        return sharding.unshard(x, layout=self.layout, group=self.group, dim=dim)

    def positions(self, seqlen: int, device=None, cu_seqlens=None):
        """RoPE positions of this rank's tokens: global positions, or, for packed
        documents (``cu_seqlens``), positions within each token's document."""
        if cu_seqlens is None:
            return sharding.positions(seqlen, layout=self.layout, group=self.group, device=device)
        return self.shard(document_positions(cu_seqlens), dim=0).to(device)

    def __repr__(self):
        return (f"SequenceParallel(strategy={self.strategy!r}, layout={self.layout!r}, "
                f"world_size={self.world_size}, backend={self.backend!r})")
