"""Range masks: any mask as a short list of (query range, key range, kind) slices.

A ``RangeMask`` over the full packed sequence says: query i may attend key j when some
slice has i in its query range, j in its key range and, for kind "causal", j <= i (global
positions). Prefix-LM, bidirectional packing, one prompt shared by many responses and
chunked attention are a few slices each, so the mask stays O(slices) at millions of
tokens: nothing here is per token pair.

The slices are normalised once into disjoint ones (``slices``): the query axis is cut at
every slice boundary, and in each query segment the key ranges of the slices covering it
are merged ("full" wins where a full and a causal range overlap; a causal range entirely at
or before the segment's first query is full, one entirely after its last query is empty).
Disjoint slices are ``ringattn.visibility`` regions (a causal one: keys at or before the
query), so a rank's ring steps become a few varlen kernel calls that count no pair twice,
whatever the layout.
"""
from __future__ import annotations

import torch

from .visibility import INF, Regions, deprecated_position_tasks

KINDS = ("full", "causal")


def _pairs(name: str, ranges) -> list[tuple[int, int]]:
    t = torch.as_tensor(ranges)
    if t.numel() == 0:
        return []
    if t.is_floating_point() or t.dtype == torch.bool:
        raise ValueError(f"RangeMask: {name} must hold integers; got dtype {t.dtype}")
    if t.dim() != 2 or t.shape[1] != 2:
        raise ValueError(f"RangeMask: {name} must have shape (n, 2) of [start, end) pairs; "
                         f"got shape {tuple(t.shape)}")
    return [tuple(p) for p in t.tolist()]


class RangeMask:
    """Visibility as (q range, k range, kind) slices in global positions (see module doc).

    ``q_ranges``, ``k_ranges``: (n, 2) ints, half-open [start, end) (any order, may
    overlap); ``kinds``: n of "full" | "causal". ``seqlen``: the full packed sequence length
    (default: the largest range end; the attention call checks it against the shards).
    Queries no slice covers see nothing: their output is 0 and their lse -inf.
    """

    is_range, is_plain = True, False  # what the planners ask of any mask

    def __init__(self, q_ranges, k_ranges, kinds, seqlen: int | None = None):
        qr, kr = _pairs("q_ranges", q_ranges), _pairs("k_ranges", k_ranges)
        kinds = [kinds] if isinstance(kinds, str) else list(kinds)
        if not (len(qr) == len(kr) == len(kinds)):
            raise ValueError(f"RangeMask: q_ranges, k_ranges and kinds must have one entry per "
                             f"slice; got {len(qr)}, {len(kr)} and {len(kinds)}")
        if not qr:
            raise ValueError("RangeMask: no slices (a mask that hides everything is refused)")
        for i, kind in enumerate(kinds):
            if kind not in KINDS:
                raise ValueError(f"RangeMask: kinds[{i}] = {kind!r}; choose one of {list(KINDS)}")
        for name, ranges in (("q_ranges", qr), ("k_ranges", kr)):
            for i, (a, b) in enumerate(ranges):
                if a < 0:
                    raise ValueError(f"RangeMask: {name}[{i}] = [{a}, {b}) starts before 0")
                if b <= a:
                    raise ValueError(f"RangeMask: {name}[{i}] = [{a}, {b}) is empty (end <= start)")
        end = max(b for _, b in qr + kr)
        if seqlen is None:
            seqlen = end
        elif end > seqlen:
            raise ValueError(f"RangeMask: a range ends at {end}, beyond seqlen={seqlen}")
        self.seqlen = int(seqlen)
        self.given = (tuple(qr), tuple(kr), tuple(kinds))
        self.slices = _normalise(qr, kr, kinds)

    # --- constructors ------------------------------------------------------------------
    @classmethod
    def causal(cls, seqlen: int) -> "RangeMask":
        """Plain causal attention over ``seqlen`` tokens."""
        return cls([(0, seqlen)], [(0, seqlen)], ["causal"])

    @classmethod
    def documents(cls, cu_seqlens, causal: bool = True) -> "RangeMask":
        """Packed documents (``cu_seqlens``: their boundaries), causal within each."""
        cu = _boundaries(cu_seqlens)
        spans = list(zip(cu[:-1], cu[1:]))
        return cls(spans, spans, ["causal" if causal else "full"] * len(spans), cu[-1])

    @classmethod
    def bidirectional_documents(cls, cu_seqlens) -> "RangeMask":
        """Packed documents, each attending to itself in both directions (encoders)."""
        return cls.documents(cu_seqlens, causal=False)

    @classmethod
    def prefix_lm(cls, cu_seqlens, prefix_lens) -> "RangeMask":
        """Per document: its first ``prefix_lens[d]`` tokens see each other both ways (a
        prompt, an image), the rest is causal over the whole document."""
        cu = _boundaries(cu_seqlens)
        prefix = [int(p) for p in torch.as_tensor(prefix_lens).flatten().tolist()]
        if len(prefix) != len(cu) - 1:
            raise ValueError(f"RangeMask.prefix_lm: {len(cu) - 1} documents but "
                             f"{len(prefix)} prefix lengths")
        q, k, kinds = [], [], []
        for d, (a, b) in enumerate(zip(cu[:-1], cu[1:])):
            p = prefix[d]
            if not 0 <= p <= b - a:
                raise ValueError(f"RangeMask.prefix_lm: prefix_lens[{d}] = {p} is not within "
                                 f"document {d}'s length {b - a}")
            if p:
                q.append((a, a + p)), k.append((a, a + p)), kinds.append("full")
            if a + p < b:
                q.append((a + p, b)), k.append((a, b)), kinds.append("causal")
        return cls(q, k, kinds, cu[-1])

    @classmethod
    def shared_prefix(cls, prompt_len: int, response_lens) -> "RangeMask":
        """One prompt (causal) followed by responses that each see the whole prompt and
        themselves (causally), never each other: many completions of one prompt, packed."""
        lens = [int(n) for n in torch.as_tensor(response_lens).flatten().tolist()]
        if prompt_len < 1 or not lens or min(lens) < 1:
            raise ValueError(f"RangeMask.shared_prefix: prompt_len ({prompt_len}) and every "
                             f"response length ({lens}) must be >= 1, with at least one response")
        q, k, kinds, start = [(0, prompt_len)], [(0, prompt_len)], ["causal"], prompt_len
        for n in lens:
            q += [(start, start + n)] * 2
            k += [(0, prompt_len), (start, start + n)]
            kinds += ["full", "causal"]
            start += n
        return cls(q, k, kinds, start)

    @classmethod
    def chunked(cls, seqlen: int, chunk: int, cu_seqlens=None) -> "RangeMask":
        """Causal attention inside consecutive chunks of ``chunk`` tokens (Llama 4's local
        layers); with ``cu_seqlens`` the chunks restart at every document."""
        if chunk < 1:
            raise ValueError(f"RangeMask.chunked: chunk must be >= 1; got {chunk}")
        cu = [0, int(seqlen)] if cu_seqlens is None else _boundaries(cu_seqlens)
        if cu[-1] != seqlen:
            raise ValueError(f"RangeMask.chunked: cu_seqlens ends at {cu[-1]}, not seqlen={seqlen}")
        spans = [(s, min(s + chunk, b)) for a, b in zip(cu[:-1], cu[1:]) for s in range(a, b, chunk)]
        return cls(spans, spans, ["causal"] * len(spans), seqlen)

    # --- what the planners ask -------------------------------------------------------------
    def check_seqlen(self, seqlen: int) -> None:
        if seqlen != self.seqlen:
            raise ValueError(f"RangeMask was built for a sequence of {self.seqlen} tokens, but the "
                             f"shards add up to {seqlen} (local length x ranks)")

    @property
    def cu_seqlens(self) -> torch.Tensor:
        """int32 segment boundaries for ``doc_zigzag`` placement: the query axis cut wherever
        the mask changes and wherever a causal range's diagonal enters or leaves it, so each
        query's work is affine in its position inside a segment (zigzag halves of a segment
        then carry equal work). Shard with ``cu_seqlens=mask.cu_seqlens`` under doc_zigzag."""
        if not hasattr(self, "_segments"):
            cuts = {0, self.seqlen}
            for qa, qb, ka, kb, causal in self.slices:
                cuts.update((qa, qb))
                if causal:
                    cuts.update(c for c in (ka, kb) if qa < c < qb)
            self._segments = torch.tensor(sorted(cuts), dtype=torch.int32)
        return self._segments

    @staticmethod
    def fingerprint(masks) -> list[int]:
        """Three integers, equal on every rank iff (almost surely) the masks are: their
        count, slice count and a position-weighted sum of their slices (cheaply compared)."""
        flat = torch.tensor([v for m in masks for s in ((m.seqlen,),) + m.slices for v in s],
                            dtype=torch.int64)
        weights = torch.arange(1, flat.numel() + 1) % 1000003
        return [len(masks), flat.numel(), int((flat * weights).sum())]

    def regions(self) -> Regions:
        """The slices as ``ringattn.visibility`` regions (causal: keys at or before the query)."""
        s = torch.tensor([sl[:4] for sl in self.slices], dtype=torch.int64).reshape(-1, 4)
        causal = torch.tensor([sl[4] for sl in self.slices], dtype=torch.bool)
        return Regions.of(s[:, 0], s[:, 1], s[:, 2], s[:, 3], INF,
                          torch.where(causal, 0, INF))

    def visible(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        """Per query position, how many of the (increasing) key positions it sees."""
        counts = torch.zeros(len(q_pos), dtype=torch.int64)
        for r0, r1, c0, c1, causal in self._boxes(q_pos, k_pos):
            if causal:
                counts[r0:r1] += _staircase(q_pos[r0:r1], k_pos, c0, c1)
            else:
                counts[r0:r1] += c1 - c0
        return counts

    def dense(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        """(len(q_pos), len(k_pos)) bool, True = visible (for small tiles and tests)."""
        out = torch.zeros(len(q_pos), len(k_pos), dtype=torch.bool)
        for r0, r1, c0, c1, causal in self._boxes(q_pos, k_pos):
            box = torch.ones(r1 - r0, c1 - c0, dtype=torch.bool)
            if causal:
                box = k_pos[None, c0:c1] <= q_pos[r0:r1, None]
            out[r0:r1, c0:c1] = box
        return out

    def tasks(self, q_pos: torch.Tensor, k_pos: torch.Tensor):
        """Deprecated: ``ringattn.visibility.position_tasks(mask, q_pos, k_pos)``."""
        return deprecated_position_tasks("RangeMask.tasks", self, q_pos, k_pos)

    def _boxes(self, q_pos, k_pos):
        """(row0, row1, col0, col1, causal) of every slice that meets the block."""
        if not self.slices:
            return []
        s = torch.tensor([sl[:4] for sl in self.slices], dtype=torch.int64)
        r = torch.searchsorted(q_pos.contiguous(), s[:, :2].contiguous())
        c = torch.searchsorted(k_pos.contiguous(), s[:, 2:].contiguous())
        return [(r0, r1, c0, c1, sl[4]) for (r0, r1), (c0, c1), sl
                in zip(r.tolist(), c.tolist(), self.slices) if r1 > r0 and c1 > c0]

    def __eq__(self, other):
        return isinstance(other, RangeMask) and (self.seqlen, self.slices) == (other.seqlen, other.slices)

    def __hash__(self):
        if not hasattr(self, "_hash"):
            self._hash = hash((self.seqlen, self.slices))
        return self._hash

    def __repr__(self):
        return f"RangeMask({len(self.slices)} slices over {self.seqlen} tokens)"


def _boundaries(cu_seqlens) -> list[int]:
    cu = [int(c) for c in torch.as_tensor(cu_seqlens).flatten().tolist()]
    if len(cu) < 2 or cu[0] != 0:
        raise ValueError(f"cu_seqlens must start at 0 and hold at least 2 entries; got {cu[:8]}")
    bad = next((i for i in range(1, len(cu)) if cu[i] <= cu[i - 1]), None)
    if bad is not None:
        raise ValueError(f"cu_seqlens must be strictly increasing (no empty documents); "
                         f"cu_seqlens[{bad - 1}]={cu[bad - 1]} >= cu_seqlens[{bad}]={cu[bad]}")
    return cu


def _normalise(qr, kr, kinds) -> tuple[tuple[int, int, int, int, bool], ...]:
    """Disjoint (qa, qb, ka, kb, causal) slices with the same visibility (module doc)."""
    cuts = sorted({p for a, b in qr for p in (a, b)})
    order = sorted(range(len(qr)), key=lambda i: qr[i][0])
    active, nxt, out = [], 0, []
    for qa, qb in zip(cuts[:-1], cuts[1:]):
        while nxt < len(order) and qr[order[nxt]][0] <= qa:
            active.append(order[nxt])
            nxt += 1
        active = [i for i in active if qr[i][1] > qa]
        if not active:
            continue
        kcuts = sorted({p for i in active for p in kr[i]})
        pieces = []  # (ka, kb, causal) in key order, merged
        for ka, kb in zip(kcuts[:-1], kcuts[1:]):
            cover = [kinds[i] for i in active if kr[i][0] <= ka and kr[i][1] >= kb]
            if not cover:
                continue
            causal = "full" not in cover
            if causal and kb - 1 <= qa:
                causal = False  # every key precedes every query of the segment
            if causal and ka > qb - 1:
                continue  # every key follows every query: nothing visible
            if pieces and pieces[-1][1] == ka and pieces[-1][2] == causal:
                pieces[-1] = (pieces[-1][0], kb, causal)
            else:
                pieces.append((ka, kb, causal))
        out.append((qa, qb, pieces))
    merged = []  # consecutive query segments with the same key pieces become one
    for qa, qb, pieces in out:
        if merged and merged[-1][1] == qa and merged[-1][2] == pieces:
            merged[-1] = (merged[-1][0], qb, pieces)
        else:
            merged.append((qa, qb, pieces))
    return tuple((qa, qb, ka, kb, causal) for qa, qb, pieces in merged for ka, kb, causal in pieces)


def _staircase(q_pos, k_pos, c0, c1) -> torch.Tensor:
    """Keys of k_pos[c0:c1] at or before each query position."""
    return (torch.searchsorted(k_pos[c0:c1].contiguous(), q_pos.contiguous(), right=True))


__all__ = ["RangeMask", "KINDS"]
