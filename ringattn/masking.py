"""Packed documents and sliding windows: which keys each query may see, and each ring
step's kernel calls.

A query at global position i sees key j iff
    same document (``cu_seqlens``)  and  i - left <= j <= i + right  (``window_size``)
    and, when causal, j <= i.
That is one ``ringattn.visibility`` region per document; ``rank_steps`` turns the regions
and the layout's runs into a few varlen kernel calls per ring step (plain causal/full masks
keep the layout's own block structure). For one query the visible keys are an interval of
positions [lo(i), hi(i)], so ``visible`` (counts) and ``dense`` (small tiles, tests) need
no pair-by-pair work either. Every query sees at least itself, so valid inputs have no
empty rows.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .layouts import BlockTask, Layout
from .rangemask import RangeMask
from .visibility import INF, Pieces, Regions, Runs, calls, deprecated_position_tasks, pieces

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

    def regions(self) -> Regions:
        """The rule as ``ringattn.visibility`` regions: one per document (or one)."""
        left, right = (INF if w < 0 else w for w in self.window)
        if self.causal:
            right = min(right, 0)
        cu = self.cu_seqlens if self.cu_seqlens is not None else torch.tensor([0, self.seqlen])
        return Regions.of(cu[:-1], cu[1:], cu[:-1], cu[1:], left, right)

    def document_tasks(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> list[BlockTask]:
        """Deprecated: ``ringattn.visibility.position_tasks(mask, q_pos, k_pos)``."""
        return deprecated_position_tasks("AttentionMask.document_tasks", self, q_pos, k_pos)

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


def rank_steps(layout: Layout, mask: AttentionMask | RangeMask, world_size: int, rank: int) -> list[list[BlockTask]]:
    """The kernel calls of each of the P ring steps for ``rank`` (step i: the K/V of rank
    (rank - i) mod P). Pure: no communication, so ``AttentionPlan``, ``balance`` and benchmarks use it as is."""
    if mask.is_plain and not layout.needs_documents:  # the layout's own block structure
        local_len = mask.seqlen // world_size
        return [layout.block_tasks(rank, (rank - step) % world_size, world_size, local_len, mask.causal)
                for step in range(world_size)]
    return calls(rank_pieces(layout, mask, world_size, rank), world_size)


def rank_pieces(layout: Layout, mask: AttentionMask | RangeMask, world_size: int,
                rank: int) -> Pieces:
    """What ``rank``'s queries see of every ring step's keys (``ringattn.visibility``)."""
    cu = mask.cu_seqlens
    layout.check_documents(cu)
    stride = layout.stride_of(world_size)
    q = Runs(*layout.runs(mask.seqlen, world_size, rank, cu), stride)
    src, pos0, row0, length = layout.all_runs(mask.seqlen, world_size, cu)
    k = Runs(pos0, row0, length, stride, (rank - src) % world_size)
    return pieces(mask.regions(), q, k)


def document_positions(cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Position of each token within its own document (for RoPE of packed sequences).

    (seqlen,) LongTensor for the full packed sequence; shard it like the tokens
    (``ringattn.shard(pos, layout=..., dim=0)`` or ``SequenceParallel.positions``).
    """
    mask = AttentionMask.build(int(cu_seqlens[-1]), False, cu_seqlens)
    return torch.arange(mask.seqlen) - mask.doc_start
