"""Which tokens each rank holds, and which (Q shard, KV shard) block pairs need work.

Three layouts of a sequence of length S over P ranks (rank r):
    contiguous  r holds [r*S/P, (r+1)*S/P)
    zigzag      the sequence cut into 2P chunks; r holds chunks r and 2P-1-r
    striped     token t lives on rank t mod P
Each rank's tokens are kept in increasing global position, so on the diagonal step
(a rank's own K/V) the causal mask is the ordinary lower triangle.

``block_tasks`` turns (query rank, key rank) into the kernel calls needed under a causal
mask, each a ``BlockTask`` of query rows, key rows and whether the block is causal:
fully masked pairs produce no task at all, so no work is spent on them.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

ALL = slice(None)


@dataclass(frozen=True, eq=False)
class BlockTask:
    """Attend q[:, q_rows] to k/v[:, k_rows]; ``causal`` = top-left aligned triangle.

    ``mask``: optional bool (q rows, k rows), True = visible, for blocks that documents or
    windows cut irregularly (see ``ringattn.masking``).
    """

    q_rows: slice
    k_rows: slice
    causal: bool
    mask: torch.Tensor | None = None

    def shape(self, q_len: int, k_len: int) -> tuple[int, int]:
        return len(range(*self.q_rows.indices(q_len))), len(range(*self.k_rows.indices(k_len)))

    def scores(self, q_len: int, k_len: int) -> int:
        """Query-key pairs the kernel computes for this task (per batch row and head)."""
        n, m = self.shape(q_len, k_len)
        if self.causal:  # top-left triangle: row i sees min(i + 1, m) keys
            full_rows = max(0, n - m)
            k = n - full_rows
            return k * (k + 1) // 2 + full_rows * m
        return n * m


class Layout:
    name: str

    def divisor(self, world_size: int) -> int:
        """The full sequence length must be a multiple of this."""
        return world_size

    def indices(self, seqlen: int, world_size: int, rank: int) -> torch.Tensor:
        """Global positions held by ``rank``, increasing (LongTensor of seqlen / P)."""
        raise NotImplementedError

    def block_tasks(self, q_rank: int, k_rank: int, world_size: int, local_len: int,
                    causal: bool) -> list[BlockTask]:
        if not causal:
            return [BlockTask(ALL, ALL, False)]
        if q_rank == k_rank:
            return [BlockTask(ALL, ALL, True)]
        return self._causal_off_diagonal(q_rank, k_rank, local_len)

    def _causal_off_diagonal(self, q_rank, k_rank, local_len) -> list[BlockTask]:
        raise NotImplementedError

    def check_seqlen(self, seqlen: int, world_size: int) -> None:
        div = self.divisor(world_size)
        if seqlen % div:
            raise ValueError(
                f"layout {self.name!r} over {world_size} ranks needs the sequence length to be "
                f"a multiple of {div}; got {seqlen}"
            )


class Contiguous(Layout):
    """Simple but imbalanced under causal: rank r works on r+1 of the P steps."""

    name = "contiguous"

    def indices(self, seqlen, world_size, rank):
        n = seqlen // world_size
        return torch.arange(rank * n, (rank + 1) * n)

    def _causal_off_diagonal(self, q_rank, k_rank, local_len):
        # Earlier keys are fully visible, later keys fully masked.
        return [BlockTask(ALL, ALL, False)] if k_rank < q_rank else []


class Zigzag(Layout):
    """Balanced under causal: every off-diagonal step is exactly half a block everywhere.

    With q chunks (r, 2P-1-r) and k chunks (s, 2P-1-s):
      s < r: chunk s precedes both query chunks and chunk 2P-1-s follows both, so all
             queries see the first half of the keys: (L x L/2) of work.
      s > r: chunk r precedes both key chunks and chunk 2P-1-r follows both, so the second
             half of the queries sees all keys: (L/2 x L) of work.
    Either way L*L/2 scores, the same as the causal diagonal step, on every rank.
    """

    name = "zigzag"

    def divisor(self, world_size):
        return 2 * world_size

    def indices(self, seqlen, world_size, rank):
        c = seqlen // (2 * world_size)
        first = torch.arange(rank * c, (rank + 1) * c)
        second = torch.arange((2 * world_size - 1 - rank) * c, (2 * world_size - rank) * c)
        return torch.cat([first, second])

    def _causal_off_diagonal(self, q_rank, k_rank, local_len):
        half = local_len // 2
        if k_rank < q_rank:
            return [BlockTask(ALL, slice(0, half), False)]
        return [BlockTask(slice(half, None), ALL, False)]


class Striped(Layout):
    """Balanced under causal: token t on rank t mod P, so every block is ~a triangle.

    Query i holds position r + iP, key j holds s + jP. Visible iff s + jP <= r + iP:
      s <= r: j <= i, the ordinary triangle;
      s >  r: j <  i, the strict triangle = the ordinary triangle of q[1:] against k[:-1].
    """

    name = "striped"

    def indices(self, seqlen, world_size, rank):
        return torch.arange(rank, seqlen, world_size)

    def _causal_off_diagonal(self, q_rank, k_rank, local_len):
        if k_rank < q_rank:
            return [BlockTask(ALL, ALL, True)]
        if local_len == 1:
            return []
        return [BlockTask(slice(1, None), slice(0, -1), True)]


LAYOUTS: dict[str, Layout] = {cls.name: cls() for cls in (Contiguous, Zigzag, Striped)}


def get_layout(name: str) -> Layout:
    try:
        return LAYOUTS[name]
    except KeyError:
        raise ValueError(f"unknown layout {name!r}; choose one of {sorted(LAYOUTS)}") from None


def layout_divisor(layout: str, world_size: int) -> int:
    """The full sequence length must be a multiple of this for ``layout`` over P ranks."""
    return get_layout(layout).divisor(world_size)
