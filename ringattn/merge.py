"""Exact merge of partial attention results computed over disjoint key blocks.

For one query row with running (o, L) and a new block (o_b, L_b), the attention over
the union of keys is
    L' = logaddexp(L, L_b)
    o' = o * exp(L - L') + o_b * exp(L_b - L') = o * sigmoid(L - L_b) + o_b * sigmoid(L_b - L)
The sigmoid form never exponentiates a large positive number, so huge logits cannot
overflow. Accumulators stay in fp32 (fp64 for fp64 inputs) across all ring steps and are
cast to the input dtype once, by the caller: rounding each step's output to bf16 would
make the error grow with ring size.
"""
from __future__ import annotations

import torch


class PartialAttention:
    """Running (out, lse) for a shard of queries.

    out: (batch, q_len, heads, head_dim) in ``dtype``; lse: (batch, heads, q_len) in ``dtype``.
    Rows that have seen no key yet hold lse = -inf and out = 0. ``like``: the query shard
    (batch, q_len, heads, d); ``head_dim``: out's head size, v's (default d; MLA's v is
    narrower than its q).
    """

    def __init__(self, like: torch.Tensor, dtype: torch.dtype, head_dim: int | None = None):
        b, s, h, d = like.shape
        self.out = torch.zeros(b, s, h, d if head_dim is None else head_dim, dtype=dtype,
                               device=like.device)
        self.lse = torch.full((b, h, s), float("-inf"), dtype=dtype, device=like.device)

    def add(self, block_out: torch.Tensor, block_lse: torch.Tensor, rows: slice = slice(None)):
        """Merge a block's result for query rows ``rows`` (a slice of the q_len dimension).

        A row whose block lse is not finite saw no key of this block: it adds exactly
        nothing, whatever ``block_out`` holds there. Kernels disagree on how they say so:
        -inf (math, sdpa), +inf (flash-attn: its softmax writes INFINITY for a row whose
        max is -inf, and its forward exits early with out 0, lse +inf for a row that sees
        no key), and fused kernels promise nothing at all for such rows (NaN, garbage). A
        finite lse with a NaN out cannot be told from a real result; no kernel writes one.
        Selected with ``where``, never multiplied by a zero share: 0 * NaN is NaN. A row no
        block sees stays out = 0, lse = -inf."""
        out, lse = self.out[:, rows], self.lse[:, :, rows]
        block_lse = block_lse.to(lse.dtype)
        # every "no key here" spelling becomes -inf, which logaddexp and sigmoid absorb
        block_lse = torch.where(torch.isfinite(block_lse), block_lse,
                                torch.full_like(block_lse, float("-inf")))
        new_lse = torch.logaddexp(lse, block_lse)  # = lse where block_lse = -inf
        # sigmoid(L_b - L) is the new block's share; a row new to us (L = -inf) takes it whole
        share = torch.sigmoid(block_lse - lse)
        share = torch.where(torch.isneginf(lse), torch.ones_like(share), share)
        share = share.transpose(1, 2).unsqueeze(-1)  # (b, q_len, heads, 1)
        hidden = torch.isneginf(block_lse).transpose(1, 2).unsqueeze(-1)
        step = share * (block_out.to(out.dtype) - out)
        out.add_(torch.where(hidden, torch.zeros_like(step), step))
        lse.copy_(new_lse)

    def add_sinks(self, sinks: torch.Tensor) -> None:
        """Fold per-head attention sinks (GPT-OSS) into the finished rows: call once, after
        every block is merged. See ``add_sinks``."""
        self.out, self.lse = add_sinks(self.out, self.lse, sinks)


def add_sinks(out: torch.Tensor, lse: torch.Tensor, sinks: torch.Tensor):
    """A sink is a per-head logit in every row's softmax denominator with no value:
        L' = logaddexp(L, sink),  o' = o * exp(L - L') = o * sigmoid(L - sink).

    out (b, s, h, d), lse (b, h, s) of the complete rows (all keys merged), sinks (h,) of any
    float dtype -> (out', lse') in out's / lse's dtype, computed in lse's (fp32/fp64).
    Applied per block instead, the sink would be counted once per block.
    """
    sinks = sinks.detach().to(lse.dtype).view(1, -1, 1)
    new_lse = torch.logaddexp(lse, sinks)
    keep = torch.sigmoid(lse - sinks).transpose(1, 2).unsqueeze(-1)  # (b, s, h, 1)
    return (out.to(lse.dtype) * keep).to(out.dtype), new_lse


def sinks_grad(dout: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
               sinks: torch.Tensor) -> torch.Tensor:
    """d loss / d sinks (h,) from this shard's query rows, given the *final* out' and lse'.

    The sink's probability is P_sink = exp(sink - L'); its value is 0, so
    d loss / d sink = P_sink * (0 - D) with D = rowsum(dO * O'), summed over batch and rows.
    The kernels' backward with (O', L') is then exact for q, k, v unchanged (their D is the
    same row sum). The sum over the other ranks' rows is the gradient reduction's job (a
    replicated parameter: DDP / DeepSpeed sum it with every other gradient).
    """
    acc = lse.dtype
    delta = (dout.to(acc) * out.to(acc)).sum(-1).transpose(1, 2)  # (b, h, s)
    p_sink = torch.exp(sinks.detach().to(acc).view(1, -1, 1) - lse)
    return (-(p_sink * delta).sum(dim=(0, 2))).to(sinks.dtype)
