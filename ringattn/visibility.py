"""Which query-key pairs of a rank's blocks are visible, as a few varlen kernel calls per step.

Any mask this library knows is a list of **regions** in global positions
    (qa, qb, ka, kb, left, right):  query i sees key j iff qa <= i < qb, ka <= j < kb and
                                    i - left <= j <= i + right   (unbounded: ``INF``)
(a document under a causal sliding window is one region; a ``RangeMask`` slice is one),
and a rank holds its tokens as a few **runs** of evenly spaced positions
    (pos0, row0, length) with the layout's stride: local rows row0.. hold positions
    pos0, pos0 + stride, ...
(``Layout.runs``: one run for contiguous and striped, two for zigzag, two per document for
doc_zigzag). A region cut to one query run and one key run is a **piece**: its local rows
i < n and keys j < m with lo <= j - i <= hi. Every row's visible keys are one interval
whose ends move by 0 or 1 per row, so a piece splits, by rows, into at most four shapes that
each have one kernel description whatever the piece's size and offset (see ``_shapes``):

    full      rectangle                               window None
    causal    row i sees keys <= i + (m - n), m >= n  window (-1, 0), bottom-right
    anti      square, row i sees keys >= i            window (0, -1)
    band      row i sees keys i .. i + w              window (w, 0)  (w = hi - lo)

Each is exact under flash-attn's own window rule (a one-sided window is only ever used on a
square or wide block, so its open side is really open), and the same shape of the same
kind can share one varlen call: flash-attn aligns windows per sequence. Pieces of one kind
whose rows *and* keys both increase form a **chain**, and a chain is one varlen call whose
segments are the pieces, with zero-length segments over the rows and keys between them
(rows with no key: out 0, lse +-inf, which the merge ignores; keys with no query: nothing).
Documents are disjoint intervals of rows and of keys in every layout (local order is
position order), so the chains of different documents concatenate: the calls per step do
not grow with the number of documents, with P or with the length.

Everything is vectorised over all pieces of all steps at once: a plan costs O(runs x
regions met) tensor work per rank (O(documents x P) for doc_zigzag, which holds a piece of
every document from every rank), no loop over ranks, tokens or token pairs.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from .layouts import BlockTask

INF = 1 << 40  # an unbounded window side (positions stay far below it)
FULL, CAUSAL, ANTI, BAND = 0, 1, 2, 3  # piece shapes (module doc)
_I64 = torch.int64


@dataclass(frozen=True)
class Runs:
    """A rank's tokens as runs of positions pos0 + stride * t, t < length, at local rows
    row0 + t (all (runs,) int64 on the host); ``step``: which ring step's keys (key runs)."""

    pos0: torch.Tensor
    row0: torch.Tensor
    length: torch.Tensor
    stride: int
    step: torch.Tensor | None = None


@dataclass(frozen=True)
class Regions:
    """(regions,) int64 columns of the visibility rule (module doc); ``INF`` = unbounded."""

    qa: torch.Tensor
    qb: torch.Tensor
    ka: torch.Tensor
    kb: torch.Tensor
    left: torch.Tensor
    right: torch.Tensor

    @staticmethod
    def of(qa, qb, ka, kb, left, right) -> "Regions":
        n = len(qa)
        col = lambda x: torch.as_tensor(x, dtype=_I64).expand(n).contiguous()  # noqa: E731
        return Regions(*(col(x) for x in (qa, qb, ka, kb, left, right)))


def _cdiv(a: torch.Tensor, b: int) -> torch.Tensor:
    return -torch.div(-a, b, rounding_mode="floor")


def _ranges(first: torch.Tensor, count: torch.Tensor):
    """(owner, index): for each i, the indices first[i] .. first[i] + count[i] - 1, with i."""
    owner = torch.repeat_interleave(torch.arange(len(first)), count)
    start = torch.cumsum(count, 0) - count
    return owner, first[owner] + torch.arange(len(owner)) - start[owner]


def _clip(runs: Runs, a: torch.Tensor, b: torch.Tensor):
    """Every (region, run) whose positions meet [a, b): (region, run, t0, t1) with the run's
    members t0 <= t < t1 inside the region (non-empty)."""
    p = runs.stride
    start = runs.pos0
    if p == 1:  # disjoint runs: those meeting [a, b) are one range of the sorted runs
        order = torch.argsort(start)
        s, e = start[order], start[order] + runs.length[order]
        lo = torch.searchsorted(e, a, right=True)
        hi = torch.searchsorted(s, b)
        region, at = _ranges(lo, (hi - lo).clamp_min(0))
        run = order[at]
    else:  # strided runs interleave: every run may meet every region (few runs: one per rank)
        region = torch.arange(len(a)).repeat_interleave(len(start))
        run = torch.arange(len(start)).repeat(len(a))
    t0 = _cdiv(a[region] - start[run], p).clamp_min(0)
    t1 = torch.minimum(_cdiv(b[region] - start[run], p), runs.length[run])
    keep = t1 > t0
    return region[keep], run[keep], t0[keep], t1[keep]


class Pieces:
    """Visible shapes as one (8, pieces) int64 table, a column per piece: ring ``step``,
    ``shape`` (FULL, CAUSAL, ANTI, BAND), band width ``w`` (0 otherwise), local rows
    [r0, r1), keys [c0, c1) and the visible pairs ``count``. One table: selecting pieces is
    one indexing, not eight."""

    def __init__(self, table: torch.Tensor):
        self.table = table

    @staticmethod
    def of(*columns: torch.Tensor) -> "Pieces":
        return Pieces(torch.stack(columns))

    step = property(lambda self: self.table[0])
    shape = property(lambda self: self.table[1])
    w = property(lambda self: self.table[2])
    r0 = property(lambda self: self.table[3])
    r1 = property(lambda self: self.table[4])
    c0 = property(lambda self: self.table[5])
    c1 = property(lambda self: self.table[6])
    count = property(lambda self: self.table[7])  # visible pairs (per batch row and head)

    def __len__(self) -> int:
        return self.table.shape[1]

    def pairs(self) -> torch.Tensor:
        """Visible query-key pairs of each piece (per batch row and head)."""
        return self.count

    def select(self, keep: torch.Tensor) -> "Pieces":
        return Pieces(self.table[:, keep])

    def cat(self, other: "Pieces") -> "Pieces":
        return Pieces(torch.cat([self.table, other.table], 1))


def pieces(regions: Regions, q_runs: Runs, k_runs: Runs) -> Pieces:
    """The visible shapes of ``q_runs`` (one rank's queries) against ``k_runs`` (the keys of
    every ring step, ``k_runs.step``) under ``regions``: what each step computes."""
    p = q_runs.stride
    qg, qr, qt0, qt1 = _clip(q_runs, regions.qa, regions.qb)
    kg, kr, kt0, kt1 = _clip(k_runs, regions.ka, regions.kb)
    # join query and key parts of the same region whose positions can see each other
    kb0 = k_runs.pos0[kr] + p * kt0  # first and last key position of each key part
    kb1 = k_runs.pos0[kr] + p * (kt1 - 1)
    if p == 1:  # one region's key parts are disjoint: those in reach are one sorted range
        big = 1 << 42  # > any position + window; keys (region, position) sort as one integer
        order = torch.argsort(kg * big + kb0)
        kg, kr, kt0, kt1, kb0, kb1 = (t[order] for t in (kg, kr, kt0, kt1, kb0, kb1))
        a0 = q_runs.pos0[qr] + qt0  # the query part's first and last positions
        a1 = q_runs.pos0[qr] + qt1 - 1
        reach_lo = (a0 - regions.left[qg]).clamp(0, big - 1)
        reach_hi = (a1 + regions.right[qg]).clamp(0, big - 1)
        lo_k = torch.searchsorted(kg * big + kb1, qg * big + reach_lo)
        hi_k = torch.searchsorted(kg * big + kb0, qg * big + reach_hi, right=True)
    else:  # strided parts of one region interleave: every pair (few: one run per rank)
        order = torch.argsort(kg, stable=True)
        kg, kr, kt0, kt1 = kg[order], kr[order], kt0[order], kt1[order]
        lo_k = torch.searchsorted(kg, qg)
        hi_k = torch.searchsorted(kg, qg, right=True)
    qi, ki = _ranges(lo_k, (hi_k - lo_k).clamp_min(0))
    g = qg[qi]
    a = q_runs.pos0[qr[qi]] + p * qt0[qi]  # first query position of the piece
    b = k_runs.pos0[kr[ki]] + p * kt0[ki]  # first key position
    n, m = qt1[qi] - qt0[qi], kt1[ki] - kt0[ki]
    row0 = q_runs.row0[qr[qi]] + qt0[qi]
    col0 = k_runs.row0[kr[ki]] + kt0[ki]
    step = k_runs.step[kr[ki]]
    left, right = regions.left[g], regions.right[g]
    # lo <= j - i <= hi in local indices (strided: positions differ by p per index)
    lo = torch.where(left >= INF, torch.full_like(a, -INF), _cdiv(a - b - left, p))
    hi = torch.where(right >= INF, torch.full_like(a, INF),
                     torch.div(a - b + right, p, rounding_mode="floor"))
    return _shapes(step, n, m, lo, hi, row0, col0)


def _shapes(step, n, m, lo, hi, row0, col0) -> Pieces:
    """Cut each piece (rows i < n see keys max(0, i + lo) .. min(m - 1, i + hi)) by rows
    where the left end stops being 0 (i > u = -lo) and the right end reaches m - 1
    (i > v = m - 1 - hi): rows up to min(u, v) are ``causal`` (left 0, right slides), then
    ``band`` (both slide, u < v) or ``full`` (neither, u > v), then rows past max(u, v)
    slide on the left only: an ``anti`` square beside a ``full`` rectangle."""
    first = torch.maximum(torch.zeros_like(n), -hi).clamp_max(n)  # rows that see a key
    stop = torch.minimum(n, m - lo).clamp_min(0)
    ok = (stop > first) & (hi >= lo)
    step, n, m, lo, hi, row0, col0, first, stop = (
        t[ok] for t in (step, n, m, lo, hi, row0, col0, first, stop))
    u, v = -lo, m - 1 - hi
    x = (torch.minimum(u, v) + 1).clamp_max(stop).clamp_min(first)
    y = (torch.maximum(u, v) + 1).clamp_max(stop).clamp_min(x)
    zero = torch.zeros_like(n)
    side = stop - y  # rows sliding on the left only: an anti square of this side
    a0 = (y + lo).clamp(min=zero, max=m)
    band = u < v
    windowed = lo > -INF
    w = torch.where(windowed, hi - lo, zero).clamp(0, INF)
    nc, nb, nf = x - first, y - x, stop - y
    causal_cols = (x + hi.clamp_max(INF)).clamp(min=zero, max=m)
    causal_pairs = nc * causal_cols - nc * (nc - 1) // 2
    # Under a window the causal rows are the top of a band (w, 0) whose left side binds no
    # row there (and flash-attn's clamp of a left side >= the keys frees it anyway): with
    # the band rows they are one band, alone a band too, so a window adds no kind of call.
    parts = [  # (shape, band width, r0, r1, c0, c1, pairs, present)
        (CAUSAL, zero, first, x, zero, causal_cols, causal_pairs, (nc > 0) & ~windowed),
        (BAND, w, first, y, (first + lo).clamp(min=zero, max=m), (y + hi).clamp(min=zero, max=m),
         nb * (w + 1) + causal_pairs, (nb > 0) & band),
        (BAND, w, first, x, zero, causal_cols, causal_pairs, (nc > 0) & windowed & ~(band & (nb > 0))),
        (FULL, zero, x, y, zero, m, nb * m, (nb > 0) & ~band),
        (ANTI, zero, y, stop, a0, a0 + side, side * (side + 1) // 2, side > 0),
        (FULL, zero, y, stop, a0 + side, m, nf * (m - a0 - side), (side > 0) & (a0 + side < m)),
    ]
    return Pieces(torch.cat([
        torch.stack([step, torch.full_like(n, shape), width, row0 + r0, row0 + r1, col0 + c0,
                     col0 + c1, pairs])[:, keep]
        for shape, width, r0, r1, c0, c1, pairs, keep in parts], 1))


def _lexsort(*keys: torch.Tensor) -> torch.Tensor:
    """The order sorting by ``keys[0]``, then ``keys[1]``, ... (stable; non-negative keys)."""
    if len(keys[0]) == 0:
        return torch.arange(0)
    bits = [max(1, int(k.max()).bit_length()) for k in keys]
    if sum(bits) <= 62:  # one sort of the keys packed into one integer
        packed = torch.zeros_like(keys[0])
        for key, b in zip(keys, bits):
            packed = (packed << b) | key
        return torch.argsort(packed, stable=True)
    order = torch.arange(len(keys[0]))
    for key in reversed(keys):
        order = order[torch.argsort(key[order], stable=True)]
    return order


def _starts(keys: torch.Tensor) -> torch.Tensor:
    """bool: where a run of equal consecutive ``keys`` starts."""
    new = torch.ones(len(keys), dtype=torch.bool)
    new[1:] = keys[1:] != keys[:-1]
    return new


def _merge_full(pc: Pieces) -> Pieces:
    """Full rectangles next to each other with the same keys (then: the same rows) become
    one: a document's two zigzag chunks seeing the same keys are one segment, not two."""
    for stack_rows in (True, False):
        # the same keys (rows) of one step, in order along the other side; full pieces first
        same = (4, 5, 6, 3) if stack_rows else (6, 3, 4, 5)  # (end, side a, side b, start)
        end_row, a, b, start = same
        t = pc.table
        pc = pc.select(_lexsort((t[1] != FULL).long(), t[0], t[a], t[b], t[start]))
        t = pc.table
        full = t[1] == FULL
        joins = torch.zeros(len(pc), dtype=torch.bool)
        joins[1:] = (full[1:] & full[:-1] & (t[0, 1:] == t[0, :-1]) & (t[a, 1:] == t[a, :-1])
                     & (t[b, 1:] == t[b, :-1]) & (t[start, 1:] == t[end_row, :-1]))
        if not bool(joins.any()):
            continue
        first = torch.nonzero(~joins).flatten()
        group = torch.cumsum(~joins, 0) - 1
        last = torch.cat([first[1:], torch.tensor([len(pc)])]) - 1
        t[end_row, first] = t[end_row, last]  # the group's end
        t[7, first] = torch.zeros_like(first).index_add_(0, group, t[7])  # its pairs
        pc = pc.select(first)
    return pc


def _kind(pc: Pieces) -> torch.Tensor:
    """One integer per (shape, band width): pieces that can share a varlen call."""
    _, w_id = torch.unique(pc.w, return_inverse=True)
    return torch.where(pc.shape == BAND, BAND + w_id, pc.shape)


def _chains(pc: Pieces, kind: torch.Tensor) -> torch.Tensor:
    """The chain of each piece (sorted by step, kind, r0, c0): pieces of one (step, kind,
    chain) have increasing rows and keys, assigned first fit."""
    group = pc.step * (int(kind.max()) + 1) + kind
    chain = torch.zeros(len(kind), dtype=_I64)
    if len(kind) < 2:
        return chain
    # blocks: a piece starts one when every piece from it on lies past every earlier piece
    # of its group in rows and keys (a new document): chain c of every block is then one
    # chain, and the first fit below never looks across blocks
    big = 1 << 26  # > any local index
    running = lambda x: torch.cummax(group * big + x, 0).values - group * big  # noqa: E731
    prev_r1 = torch.cat([torch.tensor([-1]), running(pc.r1)[:-1]])
    prev_c1 = torch.cat([torch.tensor([-1]), running(pc.c1)[:-1]])
    # rows are sorted; keys: the smallest c0 from here to the group's end (a later group's
    # values are larger, so the reversed running minimum does not leak into this one)
    later_c0 = torch.flip(torch.cummin(torch.flip(group * big + pc.c0, [0]), 0).values, [0]) - group * big
    new_block = _starts(group) | ((pc.r0 >= prev_r1) & (later_c0 >= prev_c1))
    block = torch.cumsum(new_block, 0) - 1
    starts = torch.nonzero(new_block).flatten()
    pos = torch.arange(len(kind)) - starts[block]
    width = int(pos.max()) + 1
    last_r = torch.full((len(starts), width), -1, dtype=_I64)
    last_c = torch.full((len(starts), width), -1, dtype=_I64)
    for k in range(1, width):  # position 0 of a block always takes chain 0
        if k == 1:
            at0 = starts
            last_r[block[at0], 0], last_c[block[at0], 0] = pc.r1[at0], pc.c1[at0]
        at = torch.nonzero(pos == k).flatten()
        fits = (last_r[block[at]] <= pc.r0[at, None]) & (last_c[block[at]] <= pc.c0[at, None])
        c = torch.argmax(fits.to(torch.int8), dim=1)  # the first chain it fits (unused ones fit)
        chain[at] = c
        last_r[block[at], c] = pc.r1[at]
        last_c[block[at], c] = pc.c1[at]
    return chain


_WINDOWS = {FULL: None, CAUSAL: (-1, 0), ANTI: (0, -1)}


def calls(pc: Pieces, n_steps: int) -> list[list[BlockTask]]:
    """The ``BlockTask``s of each of ``n_steps`` steps: one per chain (module doc)."""
    steps: list[list[BlockTask]] = [[] for _ in range(n_steps)]
    if len(pc) == 0:
        return steps
    pc = _merge_full(pc)
    kind = _kind(pc)
    order = _lexsort(pc.step, kind, pc.r0, pc.c0)
    pc, kind = pc.select(order), kind[order]
    chain = _chains(pc, kind)
    order = _lexsort(pc.step, kind, chain)  # stable: rows stay increasing in a chain
    pc, kind, chain = pc.select(order), kind[order], chain[order]
    is_first = _starts((pc.step * (int(kind.max()) + 1) + kind) * (int(chain.max()) + 1) + chain)
    first = torch.nonzero(is_first).flatten()
    call = torch.cumsum(is_first, 0) - 1
    # bound points of a call's segments, three per piece: (r0, previous c1) closes the rows
    # between pieces (they see no key), (r0, c0) the keys between them (no query sees them),
    # (r1, c1) the piece; points equal to the one before (no gap) are dropped
    prev_r1 = torch.where(is_first, pc.r0, torch.cat([pc.r0[:1], pc.r1[:-1]]))
    prev_c1 = torch.where(is_first, pc.c0, torch.cat([pc.c0[:1], pc.c1[:-1]]))
    rows = torch.stack([pc.r0, pc.r0, pc.r1], 1).flatten()
    keys = torch.stack([prev_c1, pc.c0, pc.c1], 1).flatten()
    rows_before = torch.stack([prev_r1, pc.r0, pc.r0], 1).flatten()
    keys_before = torch.stack([prev_c1, prev_c1, pc.c0], 1).flatten()
    keep = (rows != rows_before) | (keys != keys_before)
    point_call = call.repeat_interleave(3)[keep]
    origin_r, origin_c = pc.r0[first], pc.c0[first]
    qb = (rows[keep] - origin_r[point_call]).tolist()
    kb = (keys[keep] - origin_c[point_call]).tolist()
    per_call = torch.bincount(point_call, minlength=len(first)).tolist()
    pairs = torch.zeros(len(first), dtype=_I64).index_add_(0, call, pc.pairs()).tolist()
    last = torch.cat([first[1:], torch.tensor([len(call)])]) - 1
    heads = torch.stack([pc.step[first], pc.shape[first], pc.w[first], origin_r, pc.r1[last],
                         origin_c, pc.c1[last]], 1).tolist()
    at = 0
    for (step, shape, w, r0, r1, c0, c1), count, npairs in zip(heads, per_call, pairs):
        bounds = ((0, *qb[at:at + count]), (0, *kb[at:at + count]))
        at += count
        window = (w, 0) if shape == BAND else _WINDOWS[shape]
        if count > 1:
            task = BlockTask(slice(r0, r1), slice(c0, c1), False, window=window,
                             segments=bounds, pairs=npairs)
        elif shape == CAUSAL and r1 - r0 == c1 - c0:  # a square: the plain causal block
            task = BlockTask(slice(r0, r1), slice(c0, c1), True, pairs=npairs)
        else:
            task = BlockTask(slice(r0, r1), slice(c0, c1), False, window=window, pairs=npairs)
        steps[step].append(task)
    return steps


def position_runs(pos: torch.Tensor, step: int | None = None) -> Runs:
    """Increasing positions as ``Runs`` of consecutive ones (``step``: tag them as one ring
    step's keys)."""
    pos = torch.as_tensor(pos, dtype=_I64)
    cuts = torch.nonzero(pos[1:] - pos[:-1] != 1).flatten() + 1
    starts = torch.cat([torch.zeros(1, dtype=_I64), cuts])
    length = torch.cat([cuts, torch.tensor([len(pos)])]) - starts
    return Runs(pos[starts], starts, length, 1, None if step is None else torch.full_like(starts, step))


def position_tasks(mask, q_pos: torch.Tensor, k_pos: torch.Tensor) -> list[BlockTask]:
    """The kernel calls of queries at ``q_pos`` against keys at ``k_pos`` (increasing global
    positions, any sets) under ``mask`` (anything with ``regions()``)."""
    if len(q_pos) == 0 or len(k_pos) == 0:
        return []
    return calls(pieces(mask.regions(), position_runs(q_pos), position_runs(k_pos, 0)), 1)[0]


def deprecated_position_tasks(old: str, mask, q_pos, k_pos) -> list[BlockTask]:
    """``position_tasks`` for the methods it replaces, with their deprecation warning."""
    warnings.warn(f"{old} is deprecated and will be removed in the next release; use "
                  "ringattn.visibility.position_tasks(mask, q_pos, k_pos), or "
                  "ringattn.masking.rank_steps for a rank's ring steps", DeprecationWarning, stacklevel=3)
    return position_tasks(mask, q_pos, k_pos)


def step_pairs(pc: Pieces, n_steps: int) -> torch.Tensor:
    """(n_steps,) visible pairs each step computes."""
    return torch.zeros(n_steps, dtype=_I64).index_add_(0, pc.step, pc.pairs())


__all__ = ["INF", "Runs", "Regions", "Pieces", "pieces", "calls", "step_pairs", "position_runs", "position_tasks"]
