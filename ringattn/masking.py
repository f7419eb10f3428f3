"""Packed documents and sliding windows: which keys each query may see, block by block.

A query at global position i sees key j iff
    same document (``cu_seqlens``)  and  i - left <= j <= i + right  (``window_size``)
    and, when causal, j <= i.
For one query that is an interval of positions [lo(i), hi(i)], so for a sorted set of key
positions the number of visible keys is two ``searchsorted`` calls: block pairs are
classified (empty / full / triangle / needs a mask) without building dense masks, and a
dense boolean mask is built only for blocks that need one, trimmed to the bounding box of
their visible part. Blocks whose visible part is a band per document (see
``AttentionMask.document_tasks``) are described instead of masked: a flash-attn window,
and several documents in one block a varlen task. Every query sees at least itself, so
valid inputs have no empty rows.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from .layouts import BlockTask, Layout
from .rangemask import RangeMask

# Rows per tile when an irregular block is cut up: large enough to keep kernels efficient,
# small enough that a tile's bounding box hugs a window band or a document boundary.
TILE_ROWS = 256


def check_cu_seqlens(cu_seqlens: torch.Tensor, seqlen: int) -> None:
    """ValueError unless ``cu_seqlens`` is valid for a packed sequence of ``seqlen`` (host sync)."""
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dtype != torch.int32:
        got = cu_seqlens.dtype if isinstance(cu_seqlens, torch.Tensor) else type(cu_seqlens).__name__
        raise ValueError(f"cu_seqlens must be an int32 tensor (flash-attn convention); got {got}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must be 1-D with at least 2 entries; got shape {tuple(cu_seqlens.shape)}")
    cu = cu_seqlens.tolist()
    if cu[0] != 0:
        raise ValueError(f"cu_seqlens must start at 0; got {cu[0]}")
    bad = next((i for i in range(1, len(cu)) if cu[i] <= cu[i - 1]), None)
    if bad is not None:
        raise ValueError(
            f"cu_seqlens must be strictly increasing (no empty documents); "
            f"cu_seqlens[{bad - 1}]={cu[bad - 1]} >= cu_seqlens[{bad}]={cu[bad]}"
        )
    if cu[-1] != seqlen:
        raise ValueError(
            f"cu_seqlens must end at the full packed sequence length {seqlen} "
            f"(local length x ranks); got {cu[-1]}"
        )


def check_window(window_size) -> tuple[int, int]:
    """``window_size`` as an (left, right) int pair, or ValueError."""
    try:
        left, right = (int(w) for w in window_size)
    except (TypeError, ValueError):
        raise ValueError(f"window_size must be a pair (left, right); got {window_size!r}") from None
    if left < -1 or right < -1:
        raise ValueError(f"window_size entries must be >= 0, or -1 for unbounded; got {window_size!r}")
    return left, right


@dataclass(frozen=True)
class AttentionMask:
    """The visibility rule of one attention call over the full sequence of ``seqlen``."""

    seqlen: int
    causal: bool
    is_range = False  # not a ``RangeMask``
    window: tuple[int, int] = (-1, -1)
    doc_start: torch.Tensor | None = None  # (seqlen,) first position of each token's document
    doc_end: torch.Tensor | None = None    # (seqlen,) last position of each token's document
    cu_seqlens: torch.Tensor | None = None  # (documents + 1,) int64 on CPU, for layouts that need it

    @staticmethod
    def build(seqlen: int, causal: bool, cu_seqlens=None, window_size=(-1, -1)) -> "AttentionMask":
        window = check_window(window_size)
        if cu_seqlens is None:
            return AttentionMask(seqlen, causal, window)
        check_cu_seqlens(cu_seqlens, seqlen)
        cu = cu_seqlens.to("cpu", torch.int64)
        lengths = cu[1:] - cu[:-1]
        return AttentionMask(seqlen, causal, window,
                             torch.repeat_interleave(cu[:-1], lengths),
                             torch.repeat_interleave(cu[1:] - 1, lengths), cu)

    @property
    def is_plain(self) -> bool:
        """No documents and no window: the layouts' causal/full structure is the whole story."""
        return self.doc_start is None and self.window == (-1, -1)

    def key_interval(self, q_pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Inclusive [lo, hi] of key positions visible from each query position."""
        left, right = self.window
        lo = self.doc_start[q_pos] if self.doc_start is not None else torch.zeros_like(q_pos)
        hi = self.doc_end[q_pos] if self.doc_end is not None else torch.full_like(q_pos, self.seqlen - 1)
        if left >= 0:
            lo = torch.maximum(lo, q_pos - left)
        if right >= 0:
            hi = torch.minimum(hi, q_pos + right)
        if self.causal:
            hi = torch.minimum(hi, q_pos)
        return lo, hi

    def visible(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        """Per query position, how many of the (increasing) key positions it sees."""
        lo, hi = self.key_interval(q_pos)
        return (torch.searchsorted(k_pos, hi, right=True) - torch.searchsorted(k_pos, lo)).clamp_min(0)

    def dense(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        """(len(q_pos), len(k_pos)) bool, True = visible."""
        lo, hi = self.key_interval(q_pos)
        return (k_pos[None, :] >= lo[:, None]) & (k_pos[None, :] <= hi[:, None])

    def refine(self, task: BlockTask, q_pos: torch.Tensor, k_pos: torch.Tensor) -> list[BlockTask]:
        """Narrow a layout task to what this mask leaves visible.

        Returns no task if nothing is visible, the task itself if the mask removes nothing,
        else the tasks of ``document_tasks`` on the task's rows and keys.
        """
        rows0 = task.q_rows.indices(len(q_pos))[0]
        cols0 = task.k_rows.indices(len(k_pos))[0]
        qp, kp = q_pos[task.q_rows], k_pos[task.k_rows]
        total = int(self.visible(qp, kp).sum())
        if total == 0:
            return []
        if total == task.scores(len(q_pos), len(k_pos)):
            return [task]  # the mask removes nothing from the layout's block
        return [_shift(t, rows0, cols0) for t in self.document_tasks(qp, kp)]

    def document_tasks(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> list[BlockTask]:
        """Tasks for any increasing position sets, found document by document.

        A document's rows are one run of local rows and its keys one run of local keys, and
        each of its queries sees an interval of them. Where those intervals, in local
        indices, form a band (always, for runs of evenly spaced positions: contiguous
        chunks, striped shards), the document's visible part is exactly one flash-attn
        window on its bounding box (full, a triangle, or a band: ``_band``); documents
        next to each other (rows and keys) with the same window become one varlen task.
        A document whose rows jump (a zigzag rank's two chunks of it) is tried run by run.
        What is still no band is cut into ``TILE_ROWS``-row tiles, each a band where it is one
        and a dense mask on its bounding box otherwise, so a window band or a document
        boundary costs about its own area rather than the whole block.
        """
        lo, hi = self.key_interval(q_pos)
        first = torch.searchsorted(k_pos, lo)
        last = torch.searchsorted(k_pos, hi, right=True) - 1
        if self.doc_start is None:
            q_doc, k_doc = torch.zeros_like(q_pos), torch.zeros_like(k_pos)
        else:
            q_doc, k_doc = self.doc_start[q_pos], self.doc_start[k_pos]
        docs, sizes = torch.unique_consecutive(q_doc, return_counts=True)
        k_lo = torch.searchsorted(k_doc, docs).tolist()
        k_hi = torch.searchsorted(k_doc, docs, right=True).tolist()
        pieces, a = [], 0  # bands (r0, r1, c0, c1, window) and dense tasks, in row order
        for n, ka, kb in zip(sizes.tolist(), k_lo, k_hi):
            a0, a = a, a + n
            if ka == kb:
                continue
            whole = _band(first[a0:a], last[a0:a], a0)
            for r0, r1 in [(a0, a)] if whole is not None else _even_runs(q_pos, a0, a):
                piece = whole or _band(first[r0:r1], last[r0:r1], r0)
                if piece is not None:
                    pieces.append(piece)
                elif bool((last[r0:r1] >= first[r0:r1]).any()):
                    pieces += self._tiles(q_pos, k_pos, first, last, r0, r1, ka, kb)
        return _group(pieces)

    def _tiles(self, q_pos, k_pos, first, last, a0, a1, ka, kb) -> list:
        """Rows a0:a1 (keys ka:kb) in ``TILE_ROWS``-row tiles: a band, or a dense mask."""
        out = []
        for t0 in range(a0, a1, TILE_ROWS):
            t1 = min(t0 + TILE_ROWS, a1)
            piece = _band(first[t0:t1], last[t0:t1], t0)
            if piece is not None:
                out.append(piece)
                continue
            visible = self.dense(q_pos[t0:t1], k_pos[ka:kb])
            rows = torch.nonzero(visible.any(dim=1)).flatten()
            if len(rows) == 0:
                continue
            cols = torch.nonzero(visible.any(dim=0)).flatten()
            r0, r1, c0, c1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
            out.append(BlockTask(slice(t0 + r0, t0 + r1), slice(ka + c0, ka + c1), False,
                                 mask=visible[r0:r1, c0:c1]))
        return out


def _even_runs(q_pos: torch.Tensor, a0: int, a1: int) -> list[tuple[int, int]]:
    """Rows a0:a1 (one document) cut where their positions jump by more than their smallest
    step (a zigzag rank's two chunks of a document): runs of evenly spaced positions."""
    if a1 - a0 < 3:
        return [(a0, a1)]
    step = q_pos[a0 + 1:a1] - q_pos[a0:a1 - 1]
    cuts = (torch.nonzero(step > step.min()).flatten() + a0 + 1).tolist()
    bounds = [a0, *cuts, a1]
    return list(zip(bounds[:-1], bounds[1:]))


def _band(first: torch.Tensor, last: torch.Tensor, row0: int):
    """(r0, r1, c0, c1, window) if rows row0.. seeing keys first..last (inclusive, local)
    are, on their bounding box, exactly a bottom-right aligned flash-attn window; else None.

    On the bounding box of a band lo <= j - i <= hi (both corners are then visible: row 0
    sees key 0 and the last row the last key), the band is the window
    left = (m - n) - lo >= 0, right = hi - (m - n) >= 0; a side that binds no row is -1.
    """
    seen = torch.nonzero(last >= first).flatten()
    if len(seen) == 0:
        return None
    r0, r1 = int(seen[0]), int(seen[-1]) + 1
    if len(seen) != r1 - r0:
        return None  # rows that see nothing between rows that do: not a band
    f, l_ = first[r0:r1], last[r0:r1]
    c0, c1 = int(f.min()), int(l_.max()) + 1
    n, m = r1 - r0, c1 - c0
    i = torch.arange(n)
    lo, hi = int((f - c0 - i).min()), int((l_ - c0 - i).max())
    if not (torch.equal(f - c0, (i + lo).clamp_min(0)) and torch.equal(l_ - c0, (i + hi).clamp_max(m - 1))):
        return None
    left, right = (m - n) - lo, hi - (m - n)
    assert left >= 0 and right >= 0, "a band's bounding box holds both of its corners"
    window = (-1 if left >= m - 1 else left, -1 if right >= n - 1 else right)
    return row0 + r0, row0 + r1, c0, c1, window


def _task(r0, r1, c0, c1, window) -> BlockTask:
    """One band as a task: full, a top-left causal square, or a window."""
    if window == (-1, -1):
        return BlockTask(slice(r0, r1), slice(c0, c1), False)
    if window == (-1, 0) and r1 - r0 == c1 - c0:
        return BlockTask(slice(r0, r1), slice(c0, c1), True)
    return BlockTask(slice(r0, r1), slice(c0, c1), False, window=window)


def _group(pieces: list) -> list[BlockTask]:
    """Bands next to each other in rows and keys with the same window -> one varlen task."""
    tasks, run = [], []

    def flush():
        if len(run) == 1:
            tasks.append(_task(*run[0]))
        elif run:
            qb = tuple(p[0] - run[0][0] for p in run) + (run[-1][1] - run[0][0],)
            kb = tuple(p[2] - run[0][2] for p in run) + (run[-1][3] - run[0][2],)
            window = None if run[0][4] == (-1, -1) else run[0][4]
            tasks.append(BlockTask(slice(run[0][0], run[-1][1]), slice(run[0][2], run[-1][3]),
                                   False, window=window, segments=(qb, kb)))
        run.clear()

    for p in pieces:
        if isinstance(p, BlockTask):
            flush()
            tasks.append(p)
            continue
        if run and not (run[-1][1] == p[0] and run[-1][3] == p[2] and run[-1][4] == p[4]):
            flush()
        run.append(p)
    flush()
    return tasks


def _shift(task: BlockTask, rows0: int, cols0: int) -> BlockTask:
    """``task`` of a sub-block starting at (rows0, cols0), in the block's indices."""
    return replace(task, q_rows=slice(task.q_rows.start + rows0, task.q_rows.stop + rows0),
                   k_rows=slice(task.k_rows.start + cols0, task.k_rows.stop + cols0))


def rank_steps(layout: Layout, mask: AttentionMask | RangeMask, world_size: int, rank: int) -> list[list[BlockTask]]:
    """The kernel calls of each of the P ring steps for ``rank`` (step i: the K/V of rank
    (rank - i) mod P). Pure: no communication, so ``AttentionPlan``, ``balance`` and benchmarks use it as is."""
    cu = mask.cu_seqlens
    layout.check_documents(cu)
    local_len = mask.seqlen // world_size
    srcs = [(rank - step) % world_size for step in range(world_size)]
    q_pos = layout.indices(mask.seqlen, world_size, rank, cu)
    if isinstance(mask, RangeMask):  # any layout: the mask's slices give the blocks
        return [mask.tasks(q_pos, layout.indices(mask.seqlen, world_size, src, cu)) for src in srcs]
    if layout.needs_documents:
        return [mask.document_tasks(q_pos, layout.indices(mask.seqlen, world_size, src, cu))
                for src in srcs]
    steps = [layout.block_tasks(rank, src, world_size, local_len, mask.causal) for src in srcs]
    if mask.is_plain:
        return steps
    return [[r for t in tasks for r in mask.refine(t, q_pos, layout.indices(mask.seqlen, world_size, src))]
            for src, tasks in zip(srcs, steps)]


def document_positions(cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Position of each token within its own document (for RoPE of packed sequences).

    (seqlen,) LongTensor for the full packed sequence; shard it like the tokens
    (``ringattn.shard(pos, layout=..., dim=0)`` or ``SequenceParallel.positions``).
    """
    mask = AttentionMask.build(int(cu_seqlens[-1]), False, cu_seqlens)
    return torch.arange(mask.seqlen) - mask.doc_start
