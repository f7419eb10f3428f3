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
    Rows that have seen no key yet hold lse = -inf and out = 0.
    """

    def __init__(self, like: torch.Tensor, dtype: torch.dtype):
        self.out = torch.zeros(like.shape, dtype=dtype, device=like.device)
        b, s, h, _ = like.shape
        self.lse = torch.full((b, h, s), float("-inf"), dtype=dtype, device=like.device)

    def add(self, block_out: torch.Tensor, block_lse: torch.Tensor, rows: slice = slice(None)):
        """Merge a block's result for query rows ``rows`` (a slice of the q_len dimension)."""
        out, lse = self.out[:, rows], self.lse[:, :, rows]
        block_lse = block_lse.to(lse.dtype)
        new_lse = torch.logaddexp(lse, block_lse)
        # sigmoid(L_b - L) is the new block's share; a row new to both (-inf, -inf) gives
        # NaN there, and takes the block's values unchanged (they are 0 / -inf too).
        share = torch.sigmoid(block_lse - lse)
        share = torch.where(torch.isneginf(lse), torch.ones_like(share), share)
        share = share.transpose(1, 2).unsqueeze(-1)  # (b, q_len, heads, 1)
        out.add_(share * (block_out.to(out.dtype) - out))
        lse.copy_(new_lse)
