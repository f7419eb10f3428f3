"""Per-rank attention work of a layout, computed without communication (planning numbers).

``rank_work``: the query-key pairs each rank's queries must score (what any kernel has to
do; the sum is the same for every layout), counted from positions. ``scheduled_work``: what
the ring's block schedule actually computes per rank, and how much of it runs on masked
tiles. ``step_work``: the pairs each rank computes at each ring step, from the plan's pieces.

Two balance measures. ``imbalance`` (max/mean of per-rank totals) is what a rank carries
over the whole ring; but the ring runs in lock-step, every step waiting for its slowest
rank, so its time is the sum over steps of the slowest rank's work in that step:
``lockstep_imbalance`` = sum_s max_r work[r, s] / mean_r sum_s work[r, s] >= ``imbalance``.
The second is the one that predicts speed.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .layouts import get_layout
from .masking import AttentionMask, rank_pieces, rank_steps
from .rangemask import RangeMask
from .visibility import step_pairs


def rank_work(cu_seqlens, layout: str, world_size: int, *, causal: bool = True,
              window_size=(-1, -1)) -> torch.Tensor:
    """(P,) int64: visible query-key pairs of each rank's queries under ``layout``.

    ``cu_seqlens``: int32 document boundaries of the full packed sequence (one sequence).
    """
    seqlen = int(cu_seqlens[-1])
    return mask_work(AttentionMask.build(seqlen, causal, cu_seqlens, window_size), layout,
                     world_size)


def mask_work(mask: AttentionMask | RangeMask, layout: str, world_size: int) -> torch.Tensor:
    """(P,) int64: visible query-key pairs of each rank's queries under ``layout`` for any
    mask: a ``RangeMask`` (``doc_zigzag`` places tokens by its segments, ``mask.cu_seqlens``)
    or an ``AttentionMask``. Per-rank positions only; nothing per query-key pair."""
    lay = get_layout(layout)
    lay.check_seqlen(mask.seqlen, world_size)
    keys = torch.arange(mask.seqlen)  # the full sequence: keys are every position
    return torch.stack([mask.visible(lay.indices(mask.seqlen, world_size, r, mask.cu_seqlens),
                                     keys).sum() for r in range(world_size)])


def imbalance(work: torch.Tensor) -> float:
    """max / mean of per-rank work (1.0 = perfectly balanced)."""
    work = work.double()
    return float(work.max() / work.mean())


def step_work(mask: AttentionMask | RangeMask, layout: str, world_size: int,
              ranks=None) -> torch.Tensor:
    """(len(ranks), P) int64: visible pairs rank r computes at ring step s (the K/V of rank
    (r - s) mod P), for ``ranks`` (default: all). One plan's pieces per rank, no tasks."""
    lay = get_layout(layout)
    lay.check_seqlen(mask.seqlen, world_size)
    ranks = range(world_size) if ranks is None else ranks
    return torch.stack([step_pairs(rank_pieces(lay, mask, world_size, r), world_size)
                        for r in ranks])


def lockstep_imbalance(work: torch.Tensor) -> float:
    """sum over steps of the slowest rank's work / mean per-rank total, for ``work`` (ranks,
    steps) from ``step_work`` (1.0: every step balanced; the ring's real pace)."""
    work = work.double()
    return float(work.max(0).values.sum() / work.sum(1).mean())


@dataclass(frozen=True)
class ScheduledWork:
    needed: torch.Tensor  # (P,) visible pairs per rank (``rank_work``)
    kernel: torch.Tensor  # (P,) pairs the planned kernel calls compute per rank
    masked: torch.Tensor  # (P,) of those, pairs computed in tiles with an explicit mask
    calls: torch.Tensor   # (P,) kernel calls per rank (all ring steps)

    @property
    def masked_share(self) -> float:
        return float(self.masked.sum() / self.kernel.sum())


def scheduled_work(cu_seqlens, layout: str, world_size: int, *, causal: bool = True,
                   window_size=(-1, -1)) -> ScheduledWork:
    """What ``ring_attention``'s block schedule computes on each rank for one packed sequence (every
    step of the ring, as ``ringattn.masking.rank_steps`` gives it). Builds the same block
    tasks the ring does, so it costs what planning costs: use ``rank_work`` for balance."""
    seqlen = int(cu_seqlens[-1])
    mask = AttentionMask.build(seqlen, causal, cu_seqlens, window_size)
    lay = get_layout(layout)
    lay.check_seqlen(seqlen, world_size)
    local = seqlen // world_size
    kernel, masked, calls = [], [], []
    for r in range(world_size):
        tasks = [t for step in rank_steps(lay, mask, world_size, r) for t in step]
        kernel.append(sum(t.scores(local, local) for t in tasks))
        masked.append(sum(t.scores(local, local) for t in tasks if t.mask is not None))
        calls.append(len(tasks))
    as_t = lambda xs: torch.tensor(xs, dtype=torch.int64)  # noqa: E731
    return ScheduledWork(rank_work(cu_seqlens, layout, world_size, causal=causal, window_size=window_size),
                    as_t(kernel), as_t(masked), as_t(calls))


def lognormal_documents(seqlen: int, *, mean: float = 4096.0, sigma: float = 1.0,
                        seed: int = 0) -> torch.Tensor:
    """int32 cu_seqlens of one ``seqlen`` sequence packed with log-normal document lengths
    (mean ``mean`` tokens, log-space std ``sigma``; the last document is cut at ``seqlen``)."""
    gen = torch.Generator().manual_seed(seed)
    mu = torch.log(torch.tensor(mean)) - sigma ** 2 / 2  # E[exp(N(mu, s^2))] = exp(mu + s^2/2)
    ends, total = [0], 0
    while total < seqlen:
        n = max(1, int(torch.exp(mu + sigma * torch.randn((), generator=gen)).round()))
        total = min(seqlen, total + n)
        ends.append(total)
    return torch.tensor(ends, dtype=torch.int32)
