"""Which attention heads each Ulysses rank computes, for any head count.

Query heads are split as evenly as possible: the first ``heads % u`` ranks get
ceil(heads / u) heads, the others floor(heads / u), each a contiguous range (so an
all-to-all of uneven sizes moves every head exactly once: the same bytes as an even split,
nothing padded). Each rank receives the contiguous range of K/V heads its query heads use
(query head i uses K/V head i // (heads / kv_heads)); ranges may overlap when a K/V head
serves query heads on two ranks, and its gradient is then summed over them. This covers
kv_heads that divide u, are multiples of it, or neither (28 heads / 4 K/V heads at u = 8).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class HeadSplit:
    """Per-rank [lo, hi) ranges of query heads (``q``, a partition) and K/V heads (``kv``)."""

    heads: int
    kv_heads: int
    size: int
    q: tuple[tuple[int, int], ...]
    kv: tuple[tuple[int, int], ...]

    @property
    def even(self) -> bool:
        return len({hi - lo for lo, hi in self.q}) == 1 and len({hi - lo for lo, hi in self.kv}) == 1

    def kv_index(self, rank: int) -> list[int] | None:
        """Local K/V head used by each local query head of ``rank``, or None when that is
        the kernels' own GQA mapping (equal contiguous groups: local i -> i // groups)."""
        (qlo, qhi), (kvlo, kvhi) = self.q[rank], self.kv[rank]
        group = self.heads // self.kv_heads
        index = [i // group - kvlo for i in range(qlo, qhi)]
        n_q, n_kv = qhi - qlo, kvhi - kvlo
        if n_q % n_kv == 0 and index == [i // (n_q // n_kv) for i in range(n_q)]:
            return None
        return index


def split_heads(heads: int, kv_heads: int, size: int) -> HeadSplit:
    """The head ranges of every rank of a Ulysses group of ``size`` ranks."""
    if heads < size:
        raise ValueError(
            f"Ulysses over {size} ranks needs at least {size} query heads (each rank computes "
            f"whole heads); got {heads}: use a smaller Ulysses size, or ring/hybrid attention"
        )
    if kv_heads < 1 or heads % kv_heads:
        raise ValueError(f"heads ({heads}) must be a multiple of kv_heads ({kv_heads}) for GQA/MQA")
    base, extra = divmod(heads, size)
    group = heads // kv_heads
    q, kv, lo = [], [], 0
    for r in range(size):
        hi = lo + base + (r < extra)
        q.append((lo, hi))
        kv.append((lo // group, (hi - 1) // group + 1))
        lo = hi
    return HeadSplit(heads, kv_heads, size, tuple(q), tuple(kv))

