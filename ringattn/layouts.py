"""Which tokens each rank holds, and which (Q shard, KV shard) block pairs need work.

Four layouts of a sequence of length S over P ranks (rank r):
    contiguous  r holds [r*S/P, (r+1)*S/P)
    zigzag      the sequence cut into 2P chunks; r holds chunks r and 2P-1-r
    striped     token t lives on rank t mod P
    doc_zigzag  every packed document cut into 2P chunks; r holds chunks r and 2P-1-r of
                each (needs the document boundaries ``cu_seqlens``; see ``DocZigzag``)
Each rank's tokens are kept in increasing global position, so on the diagonal step
(a rank's own K/V) the causal mask is the ordinary lower triangle.

``block_tasks`` turns (query rank, key rank) into the kernel calls needed under a causal
mask, each a ``BlockTask`` of query rows, key rows and whether the block is causal:
fully masked pairs produce no task at all, so no work is spent on them. Layouts that
place tokens by document have no such structure without the documents
(``needs_documents``): their tasks come from ``ringattn.visibility`` over the layout's ``runs``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

ALL = slice(None)


@dataclass(frozen=True, eq=False)
class BlockTask:
    """Attend q[:, q_rows] to k/v[:, k_rows]; ``causal`` = top-left aligned triangle.

    Blocks that documents or windows cut carry a small description of what is visible,
    exactly as flash-attn expresses it (see ``ringattn.masking``):
    ``window``: (left, right), a band bottom-right aligned: of n rows and m keys, row i sees
        key j iff i + (m - n) - left <= j <= i + (m - n) + right (-1 = unbounded);
    ``segments``: (q_bounds, k_bounds), host int tuples relative to the block: independent
        packed sequences (documents), rows q_bounds[s]:q_bounds[s+1] seeing only keys
        k_bounds[s]:k_bounds[s+1], each under ``window`` aligned to its own lengths;
        ``cu_seqlens`` holds them as int32 tensors on the data's device (set by the plan);
    ``mask``: bool (q rows, k rows), True = visible, for anything else (a dense tile).
    Segments may be empty on one side: rows that see no key (out 0, lse -inf or, from
    flash-attn, +inf: the merge ignores both) or keys that no row sees, so that one varlen
    call can skip what lies between the pieces it computes (``ringattn.visibility``).
    """

    q_rows: slice
    k_rows: slice
    causal: bool
    mask: torch.Tensor | None = None
    window: tuple[int, int] | None = None
    segments: tuple[tuple[int, ...], tuple[int, ...]] | None = None
    cu_seqlens: tuple[torch.Tensor, torch.Tensor] | None = None
    pairs: int | None = None  # visible pairs, when the planner counted them

    @property
    def kind(self) -> str:
        """What the kernel is asked to do: full, causal, window, varlen or mask."""
        if self.mask is not None:
            return "mask"
        if self.segments is not None:
            return "varlen"
        if self.window is not None:
            return "window"
        return "causal" if self.causal else "full"

    def shape(self, q_len: int, k_len: int) -> tuple[int, int]:
        return len(range(*self.q_rows.indices(q_len))), len(range(*self.k_rows.indices(k_len)))

    def scores(self, q_len: int, k_len: int) -> int:
        """Query-key pairs the kernel computes for this task (per batch row and head);
        for masks, the bounding box the kernel runs on."""
        if self.pairs is not None:
            return self.pairs
        n, m = self.shape(q_len, k_len)
        if self.segments is not None:
            qb, kb = self.segments
            return sum(band_pairs(qb[s + 1] - qb[s], kb[s + 1] - kb[s], self.window)
                       for s in range(len(qb) - 1))
        if self.window is not None:
            return band_pairs(n, m, self.window)
        if self.causal:  # top-left triangle: row i sees min(i + 1, m) keys
            full_rows = max(0, n - m)
            k = n - full_rows
            return k * (k + 1) // 2 + full_rows * m
        return n * m


def band_pairs(n: int, m: int, window: tuple[int, int] | None) -> int:
    """Visible pairs of an n x m block under a bottom-right ``window`` (None: all)."""
    if window is None:
        return n * m
    left, right = window
    i = torch.arange(n) + (m - n)
    lo = (i - left).clamp_min(0) if left >= 0 else torch.zeros_like(i)
    hi = (i + right).clamp_max(m - 1) if right >= 0 else torch.full_like(i, m - 1)
    return int((hi - lo + 1).clamp_min(0).sum())


class Layout:
    name: str
    needs_documents = False  # token placement depends on cu_seqlens

    def check_documents(self, cu_seqlens) -> None:
        if self.needs_documents and cu_seqlens is None:
            raise ValueError(f"layout {self.name!r} places tokens by document: pass cu_seqlens "
                             "(the int32 document boundaries of the full packed sequence)")

    def divisor(self, world_size: int) -> int:
        """The full sequence length must be a multiple of this."""
        return world_size

    def indices(self, seqlen: int, world_size: int, rank: int, cu_seqlens=None) -> torch.Tensor:
        """Global positions held by ``rank``, increasing (LongTensor of seqlen / P).
        ``cu_seqlens`` is used only by layouts that ``needs_documents``."""
        raise NotImplementedError

    def stride_of(self, world_size: int) -> int:
        """Positions of consecutive local rows in one of ``runs`` differ by this."""
        return 1

    def runs(self, seqlen: int, world_size: int, rank: int, cu_seqlens=None):
        """``rank``'s tokens as runs: (pos0, row0, length) int64 host tensors; local rows
        row0 + t hold positions pos0 + stride * t (``ringattn.visibility``)."""
        raise NotImplementedError

    def all_runs(self, seqlen: int, world_size: int, cu_seqlens=None):
        """Every rank's ``runs`` at once: (rank, pos0, row0, length) int64 host tensors."""
        parts = [self.runs(seqlen, world_size, r, cu_seqlens) for r in range(world_size)]
        rank = torch.repeat_interleave(torch.arange(world_size),
                                       torch.tensor([len(p[0]) for p in parts]))
        return (rank, *(torch.cat([p[i] for p in parts]) for i in range(3)))

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

    def indices(self, seqlen, world_size, rank, cu_seqlens=None):
        n = seqlen // world_size
        return torch.arange(rank * n, (rank + 1) * n)

    def runs(self, seqlen, world_size, rank, cu_seqlens=None):
        n = seqlen // world_size
        return _runs([rank * n], [0], [n])

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

    def indices(self, seqlen, world_size, rank, cu_seqlens=None):
        c = seqlen // (2 * world_size)
        first = torch.arange(rank * c, (rank + 1) * c)
        second = torch.arange((2 * world_size - 1 - rank) * c, (2 * world_size - rank) * c)
        return torch.cat([first, second])

    def runs(self, seqlen, world_size, rank, cu_seqlens=None):
        c = seqlen // (2 * world_size)
        return _runs([rank * c, (2 * world_size - 1 - rank) * c], [0, c], [c, c])

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

    def stride_of(self, world_size: int) -> int:
        return world_size

    def indices(self, seqlen, world_size, rank, cu_seqlens=None):
        return torch.arange(rank, seqlen, world_size)

    def runs(self, seqlen, world_size, rank, cu_seqlens=None):
        return _runs([rank], [0], [seqlen // world_size])

    def _causal_off_diagonal(self, q_rank, k_rank, local_len):
        if k_rank < q_rank:
            return [BlockTask(ALL, ALL, True)]
        if local_len == 1:
            return []
        return [BlockTask(slice(1, None), slice(0, -1), True)]


class DocZigzag(Layout):
    """Zigzag per document (per-document head-tail): balanced for packed documents.

    Document d of length L is cut into 2P chunks and rank r holds chunks r and 2P-1-r, so
    every rank does ~1/P of every document's causal work. Lengths need not divide: with
    c = L // 2P and m = L % 2P, every chunk has c tokens plus at most one of the m
    remainder tokens. The remainder tokens of all documents, in order, are dealt to ranks
    round-robin (remainder token j of the whole sequence goes to rank j mod P; a rank's
    first one from a document extends its head chunk, a second its tail chunk). The
    remainders add up to S - 2P*sum(c), a multiple of P, so every rank holds exactly S/P
    tokens — the ring needs equal shards — and a document shorter than 2P tokens is just
    c = 0: its tokens are dealt one per rank. Chunk sizes differ by at most one, so the
    imbalance a document adds is at most one token's keys per rank.
    """

    name = "doc_zigzag"
    needs_documents = True

    def chunk_sizes(self, cu_seqlens, world_size: int) -> torch.Tensor:
        """(documents, 2P) LongTensor: chunk j of each document, as dealt above."""
        cu = torch.as_tensor(cu_seqlens).to("cpu", torch.int64)
        lengths = cu[1:] - cu[:-1]
        p = world_size
        c, m = lengths // (2 * p), lengths % (2 * p)
        first = torch.cumsum(m, 0) - m  # index of each document's first remainder token
        k = (torch.arange(p)[None, :] - first[:, None]) % p  # rank r's place in the deal
        extra = (m[:, None] > k).long() + (m[:, None] > k + p).long()  # (docs, P), 0..2
        sizes = c[:, None].repeat(1, 2 * p)
        sizes[:, :p] += (extra >= 1).long()
        sizes[:, p:] += (extra == 2).long().flip(1)  # tail chunk of rank r is 2P-1-r
        return sizes

    def indices(self, seqlen, world_size, rank, cu_seqlens=None):
        seg_start, offsets, seg_len = self.runs(seqlen, world_size, rank, cu_seqlens)[:3]
        total = int(seg_len.sum())
        # positions of all runs: each run's start, repeated, plus a running offset
        return torch.repeat_interleave(seg_start - offsets, seg_len, output_size=total) + torch.arange(total)

    def runs(self, seqlen, world_size, rank, cu_seqlens=None):
        """Two runs per document (its chunks r and 2P-1-r), empty ones dropped."""
        self.check_documents(cu_seqlens)
        cu = torch.as_tensor(cu_seqlens).to("cpu", torch.int64)
        if int(cu[-1]) != seqlen:
            raise ValueError(f"cu_seqlens must end at the full packed sequence length {seqlen}; "
                             f"got {int(cu[-1])}")
        sizes = self.chunk_sizes(cu, world_size)
        mine = [rank, 2 * world_size - 1 - rank]
        starts = cu[:-1, None] + torch.cumsum(sizes[:, :mine[1] + 1], 1)[:, mine] - sizes[:, mine]
        seg_start, seg_len = starts.flatten(), sizes[:, mine].flatten()
        keep = seg_len > 0
        seg_start, seg_len = seg_start[keep], seg_len[keep]
        return seg_start, torch.cumsum(seg_len, 0) - seg_len, seg_len

    def all_runs(self, seqlen, world_size, cu_seqlens=None):
        """Every rank's runs from one (documents, 2P) table: O(documents x P), no loop."""
        self.check_documents(cu_seqlens)
        cu = torch.as_tensor(cu_seqlens).to("cpu", torch.int64)
        p = world_size
        sizes = self.chunk_sizes(cu, p)  # (docs, 2P)
        starts = cu[:-1, None] + torch.cumsum(sizes, 1) - sizes
        head, tail = torch.arange(p), 2 * p - 1 - torch.arange(p)
        # (P, docs, 2): rank r's runs in its local order (document, then head before tail)
        size = torch.stack([sizes[:, head], sizes[:, tail]], 2).permute(1, 0, 2).reshape(p, -1)
        start = torch.stack([starts[:, head], starts[:, tail]], 2).permute(1, 0, 2).reshape(p, -1)
        row0 = torch.cumsum(size, 1) - size
        rank = torch.arange(p)[:, None].expand_as(size)
        keep = size > 0
        return rank[keep], start[keep], row0[keep], size[keep]

    def block_tasks(self, q_rank, k_rank, world_size, local_len, causal):
        raise ValueError("layout 'doc_zigzag' has no block structure without the documents; "
                         "plan it with ringattn.masking.rank_steps")


def _runs(pos0, row0, length):
    return tuple(torch.tensor(x, dtype=torch.int64) for x in (pos0, row0, length))


LAYOUTS: dict[str, Layout] = {cls.name: cls() for cls in (Contiguous, Zigzag, Striped, DocZigzag)}


def get_layout(name: str) -> Layout:
    try:
        return LAYOUTS[name]
    except KeyError:
        raise ValueError(f"unknown layout {name!r}; choose one of {sorted(LAYOUTS)}") from None


def layout_divisor(layout: str, world_size: int) -> int:
    """The full sequence length must be a multiple of this for ``layout`` over P ranks."""
    return get_layout(layout).divisor(world_size)


def layout_needs_documents(layout: str) -> bool:
    """True if ``layout`` places tokens by document (shard/unshard/positions need cu_seqlens)."""
    return get_layout(layout).needs_documents
