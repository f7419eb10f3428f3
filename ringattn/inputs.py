"""Validation of attention inputs, shared by every strategy. Errors name the problem."""
from __future__ import annotations

import torch
import torch.distributed as dist

from .comm import group_device, group_size
from .headsplit import split_heads


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0) -> None:
    """Local checks: q (b, s, h, d); k (b, s_k, h_kv, d), v (b, s_k, h_kv, d_v) with
    h % h_kv == 0; v's head size d_v may differ from q/k's d (MLA)."""
    if dropout_p:
        raise ValueError(f"attention dropout is not supported (dropout_p={dropout_p}); pass 0.0")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(
                f"{name} must have 4 dims (batch, seqlen, heads, head_dim); got shape {tuple(t.shape)}"
            )
        if not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor; got {t.dtype}")
    if k.shape[:3] != v.shape[:3]:
        raise ValueError(f"k and v differ in batch, length or kv_heads: {tuple(k.shape)} vs "
                         f"{tuple(v.shape)} (only their head sizes may differ)")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v devices differ: {q.device}, {k.device}, {v.device}")
    if q.shape[0] != k.shape[0]:
        raise ValueError(f"batch sizes differ: q has {q.shape[0]}, k/v have {k.shape[0]}")
    if q.shape[3] != k.shape[3]:
        raise ValueError(f"head_dim differs: q has {q.shape[3]}, k has {k.shape[3]} (q and k "
                         "take one head size; v's may differ)")
    if q.shape[2] % k.shape[2]:
        raise ValueError(
            f"heads ({q.shape[2]}) must be a multiple of kv_heads ({k.shape[2]}) for GQA/MQA"
        )


def check_same_on_all_ranks(fields: dict[str, int], group=None,
                            cu_seqlens: torch.Tensor | None = None,
                            mask_fingerprint: list[int] = (), maxima: list[int] = ()) -> list[int]:
    """All ranks of ``group`` must hold equally shaped shards (``fields``: name -> size, e.g.
    batch and local length) and the same ``cu_seqlens`` (one tiny all-gather, one host sync).

    Without this, a rank with a different local length would deadlock the ring or read
    garbage; with it, every rank raises the same ValueError. The gathered tensor lives on the
    group's device (``comm.group_device``: NCCL, the current GPU), whatever the data's.
    ``mask_fingerprint``: integers of the step's range masks (``RangeMask.fingerprint``),
    compared too. ``maxima``: integers that may differ (each rank's ring length); returns
    their maximum over the group, element-wise, from the same all-gather.
    """
    maxima = list(maxima)
    if group_size(group) == 1:
        return maxima
    device = group_device(group)
    docs = [0, 0]
    if cu_seqlens is not None:  # a cheap fingerprint: count and position-weighted sum
        cu = cu_seqlens.to("cpu", torch.int64)
        docs = [cu.numel(), int((cu * torch.arange(1, cu.numel() + 1)).sum())]
    n = len(fields)
    mine = torch.tensor([*maxima, *fields.values(), *docs, *mask_fingerprint],
                        dtype=torch.int64, device=device)
    every = [torch.empty_like(mine) for _ in range(group_size(group))]
    dist.all_gather(every, mine, group=group)
    rows = torch.stack(every).tolist()
    k = len(maxima)
    maxima = [max(r[i] for r in rows) for i in range(k)]
    rows = [r[k:] for r in rows]
    shapes = [tuple(r[:n]) for r in rows]
    if len(set(shapes)) > 1:
        names = f"({', '.join(fields)})"
        listing = ", ".join(f"rank {i}: {s}" for i, s in enumerate(shapes))
        raise ValueError(
            f"local shards differ across the {len(shapes)} ranks of the sequence-parallel group; "
            f"every rank must hold the same local length and heads {names}: {listing}"
        )
    if len({tuple(r[n + 2:]) for r in rows}) > 1:
        raise ValueError("the RangeMask differs across the ranks of the sequence-parallel group; "
                         "pass the same full-sequence mask on every rank")
    if len({tuple(r[n:n + 2]) for r in rows}) > 1:
        raise ValueError("cu_seqlens differs across the ranks of the sequence-parallel group; "
                         "pass the same full-sequence cu_seqlens on every rank")
    return maxima


def check_ulysses_heads(heads: int, kv_heads: int, ulysses_size: int):
    """-> the ``HeadSplit`` of ``heads`` query / ``kv_heads`` K/V heads over u ranks: any
    counts with heads >= u (uneven splits included), else a ValueError."""
    return split_heads(heads, kv_heads, ulysses_size)


def check_sinks(sinks, q: torch.Tensor) -> None:
    """Attention sinks: one float logit per query head, (heads,), on q's device."""
    if sinks is None:
        return
    if not isinstance(sinks, torch.Tensor) or not sinks.is_floating_point():
        raise ValueError(f"sinks must be a floating-point tensor of shape (heads,); got {sinks!r}")
    if tuple(sinks.shape) != (q.shape[2],):
        raise ValueError(f"sinks must have shape (heads,) = ({q.shape[2]},); got {tuple(sinks.shape)}")
    if sinks.device != q.device:
        raise ValueError(f"sinks are on {sinks.device}, q on {q.device}")
