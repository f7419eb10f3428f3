"""Packed documents and sliding windows: which keys each query may see, block by block.

A query at global position i sees key j iff
    same document (``cu_seqlens``)  and  i - left <= j <= i + right  (``window_size``)
    and, when causal, j <= i.
For one query that is an interval of positions [lo(i), hi(i)], so for a sorted set of key
positions the number of visible keys is two ``searchsorted`` calls: block pairs are
classified (empty / full / triangle / needs a mask) without building dense masks, and a
dense boolean mask is built only for blocks that need one, trimmed to the bounding box of
their visible part. Every query sees at least itself, so valid inputs have no empty rows.
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

        Returns no task if nothing is visible; else tasks on the bounding boxes of the
        visible part, unmasked where a box is a full rectangle or a causal triangle, else
        carrying its boolean mask. Irregular blocks are cut into ``TILE_ROWS``-row tiles
        first, so a window band or a document boundary costs about its own area rather
        than the whole block.
        """
        rows0 = task.q_rows.indices(len(q_pos))[0]
        cols0 = task.k_rows.indices(len(k_pos))[0]
        qp, kp = q_pos[task.q_rows], k_pos[task.k_rows]
        counts = self.visible(qp, kp)
        total = int(counts.sum())
        if total == 0:
            return []
        if total == task.scores(len(q_pos), len(k_pos)):
            return [task]  # the mask removes nothing from the layout's block
        if len(qp) > TILE_ROWS:
            return [tile for start in range(0, len(qp), TILE_ROWS)
                    for tile in self.refine(
                        BlockTask(slice(rows0 + start, rows0 + min(start + TILE_ROWS, len(qp))),
                                  task.k_rows, False), q_pos, k_pos)]
        visible = self.dense(qp, kp)
        rows = torch.nonzero(counts > 0).flatten()
        cols = torch.nonzero(visible.any(dim=0)).flatten()
        r0, r1, c0, c1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
        box = visible[r0:r1, c0:c1]
        q_rows, k_rows = slice(rows0 + r0, rows0 + r1), slice(cols0 + c0, cols0 + c1)
        if bool(box.all()):
            return [BlockTask(q_rows, k_rows, False)]
        if box.shape[0] == box.shape[1] and torch.equal(box, torch.ones_like(box).tril()):
            return [BlockTask(q_rows, k_rows, True)]
        return [replace(BlockTask(q_rows, k_rows, False), mask=box)]


    def document_tasks(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> list[BlockTask]:
        """Tasks for any increasing position sets, found document by document.

        For each document the visible part of (its query rows x its key rows) becomes one
        unmasked task when it is a rectangle or a top-left causal triangle (always so for
        ``doc_zigzag`` without windows: each rank's rows of a document are one contiguous
        run of its local rows); anything else is left to ``refine``. Rows of different
        documents never share a task, so documents cost no masked tiles.
        """
        lo, hi = self.key_interval(q_pos)
        first = torch.searchsorted(k_pos, lo)
        counts = (torch.searchsorted(k_pos, hi, right=True) - first).clamp_min(0)
        if self.doc_start is None:
            q_doc, k_doc = torch.zeros_like(q_pos), torch.zeros_like(k_pos)
        else:
            q_doc, k_doc = self.doc_start[q_pos], self.doc_start[k_pos]
        docs, sizes = torch.unique_consecutive(q_doc, return_counts=True)
        k_lo = torch.searchsorted(k_doc, docs).tolist()
        k_hi = torch.searchsorted(k_doc, docs, right=True).tolist()
        tasks, a = [], 0
        for n, ka, kb in zip(sizes.tolist(), k_lo, k_hi):
            b, a0 = a + n, a
            a = b
            if ka == kb:
                continue
            seen = torch.nonzero(counts[a0:b]).flatten()
            if len(seen) == 0:
                continue
            r0, r1 = a0 + int(seen[0]), a0 + int(seen[-1]) + 1
            c, f = counts[r0:r1], first[r0:r1]
            if len(seen) == r1 - r0 and bool((f == f[0]).all()):
                f0, m = int(f[0]), int(c.max())
                if bool((c == m).all()):
                    tasks.append(BlockTask(slice(r0, r1), slice(f0, f0 + m), False))
                    continue
                if torch.equal(c, torch.arange(1, r1 - r0 + 1).clamp_max(m)):
                    tasks.append(BlockTask(slice(r0, r1), slice(f0, f0 + m), True))
                    continue
            tasks += self.refine(BlockTask(slice(a0, b), slice(ka, kb), False), q_pos, k_pos)
        return tasks


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
