"""Validation of attention inputs, shared by every strategy. Errors name the problem."""
from __future__ import annotations

import torch
import torch.distributed as dist

from .comm import group_size


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0) -> None:
    """Local checks: q (b, s, h, d); k, v (b, s_k, h_kv, d) with h % h_kv == 0."""
    if dropout_p:
        raise ValueError(f"attention dropout is not supported (dropout_p={dropout_p}); pass 0.0")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(
                f"{name} must have 4 dims (batch, seqlen, heads, head_dim); got shape {tuple(t.shape)}"
            )
        if not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor; got {t.dtype}")
    if k.shape != v.shape:
        raise ValueError(f"k and v shapes differ: {tuple(k.shape)} vs {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v devices differ: {q.device}, {k.device}, {v.device}")
    if q.shape[0] != k.shape[0]:
        raise ValueError(f"batch sizes differ: q has {q.shape[0]}, k/v have {k.shape[0]}")
    if q.shape[3] != k.shape[3]:
        raise ValueError(f"head_dim differs: q has {q.shape[3]}, k/v have {k.shape[3]}")
    if q.shape[2] % k.shape[2]:
        raise ValueError(
            f"heads ({q.shape[2]}) must be a multiple of kv_heads ({k.shape[2]}) for GQA/MQA"
        )


def check_same_on_all_ranks(q: torch.Tensor, k: torch.Tensor, group=None,
                            cu_seqlens: torch.Tensor | None = None) -> None:
    """All ranks of ``group`` must hold equally shaped shards and the same ``cu_seqlens``
    (one tiny all-gather).

    Without this, a rank with a different local length would deadlock the ring or read
    garbage; with it, every rank raises the same ValueError.
    """
    if group_size(group) == 1:
        return
    device = q.device if dist.get_backend(group) != "gloo" else torch.device("cpu")
    docs = [0, 0]
    if cu_seqlens is not None:  # a cheap fingerprint: count and position-weighted sum
        cu = cu_seqlens.to("cpu", torch.int64)
        docs = [cu.numel(), int((cu * torch.arange(1, cu.numel() + 1)).sum())]
    mine = torch.tensor([*q.shape, k.shape[1], k.shape[2], *docs], dtype=torch.int64, device=device)
    every = [torch.empty_like(mine) for _ in range(group_size(group))]
    dist.all_gather(every, mine, group=group)
    rows = [t.tolist() for t in every]
    shapes = [tuple(r[:6]) for r in rows]
    if len(set(shapes)) > 1:
        fields = "(batch, q_len, heads, head_dim, kv_len, kv_heads)"
        listing = ", ".join(f"rank {i}: {s}" for i, s in enumerate(shapes))
        raise ValueError(
            f"local shards differ across the {len(shapes)} ranks of the sequence-parallel group; "
            f"every rank must hold the same local length and heads {fields}: {listing}"
        )
    if len({tuple(r[6:]) for r in rows}) > 1:
        raise ValueError("cu_seqlens differs across the ranks of the sequence-parallel group; "
                         "pass the same full-sequence cu_seqlens on every rank")


def check_ulysses_heads(heads: int, kv_heads: int, ulysses_size: int) -> None:
    """Ulysses gives each of its u ranks heads/u query heads and the K/V heads they use.

    K/V heads split evenly (kv_heads % u == 0) or, when there are fewer than u, each is
    replicated u / kv_heads times (u % kv_heads == 0); anything else cannot be split.
    """
    u = ulysses_size
    if heads % u:
        raise ValueError(
            f"Ulysses over {u} ranks needs heads divisible by {u}; got {heads} heads"
        )
    if kv_heads % u and u % kv_heads:
        raise ValueError(
            f"Ulysses over {u} ranks needs kv_heads to divide {u} or be a multiple of it; "
            f"got {kv_heads} kv_heads"
        )
