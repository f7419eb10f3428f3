"""The contract every attention kernel backend fulfils.

A backend computes attention of one Q block against one K/V block and returns the
block's output together with its log-sum-exp, so that partial results from different
K/V blocks can be merged exactly (see ``ringattn.merge``). Its backward takes the
*final* (merged) output and log-sum-exp of the whole row, which makes each block's
gradient exact on its own (D = rowsum(dO * O) is a property of the whole row).

Shapes (flash-attn convention, sequence before heads):
    q:    (batch, q_len, heads, head_dim)
    k, v: (batch, k_len, kv_heads, head_dim), heads % kv_heads == 0
    out:  (batch, q_len, heads, head_dim)
    lse:  (batch, heads, q_len), float32 (float64 for float64 inputs)

``softcap=c`` (Gemma 2) replaces each scaled score x by c * tanh(x / c) before the softmax.
Feature flags say what a backend can do: ``supports_mask`` (a bool mask per block) and
``supports_softcap``. Attention sinks need no kernel support: they are one more term in
the merge (``ringattn.merge``), applied once per row after every block is merged.

``causal=True`` means top-left aligned: query i sees keys j <= i. Layouts only ask for
causal on blocks whose query and key index sets line up that way (see ``ringattn.layouts``).
"""
from __future__ import annotations

from typing import Protocol

import torch


class KernelBackend(Protocol):
    name: str
    supports_mask: bool  # accepts ``mask``: bool (q_len, k_len), True = visible
    supports_softcap: bool  # accepts ``softcap``: float, scores -> c * tanh(scores / c)

    def supports(self, q: torch.Tensor) -> str | None:
        """None if this backend can run q's device/dtype/head_dim, else why not."""

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float,
        mask: torch.Tensor | None = None, softcap: float | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (out in q.dtype or float32, lse float32)."""

    def backward(
        self,
        dout: torch.Tensor,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        out: torch.Tensor,
        lse: torch.Tensor,
        *,
        causal: bool,
        scale: float,
        mask: torch.Tensor | None = None,
        softcap: float | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> (dq, dk, dv) shaped like q, k, v (k/v summed over their query-head group)."""


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for 16-bit inputs (never accumulate in bf16/fp16); fp64 stays fp64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """(b, s, kv_heads, d) -> (b, s, kv_heads * groups, d); query head h uses kv head h // groups."""
    return x if groups == 1 else x.repeat_interleave(groups, dim=2)


def sum_kv_groups(dx: torch.Tensor, groups: int) -> torch.Tensor:
    """Inverse of repeat_kv for gradients: (b, s, kv_heads * groups, d) -> (b, s, kv_heads, d)."""
    if groups == 1:
        return dx
    b, s, h, d = dx.shape
    return dx.view(b, s, h // groups, groups, d).sum(dim=3)
