"""Rows a block's mask hides entirely add exactly nothing to the merge, whatever the kernel
wrote there: fused GPU kernels promise nothing for such rows (NaN, garbage), and 0 * NaN is
NaN. Proven on CPU with a kernel that writes NaN (out) and 0 (lse, as fused kernels report)
into every row its mask hides entirely, through the ring's exact per-rank schedule.
"""
from __future__ import annotations

import math

import pytest
import torch

from ringattn.blocks import attend_blocks
from ringattn.kernels.math import MathBackend
from ringattn.merge import PartialAttention
from ringattn.plan import AttentionPlan
from ringattn.sharding import held_indices
from tests.reference import reference_attention, rel_err


class NaNOnHiddenRows(MathBackend):
    """The math kernel, but rows its mask hides entirely get out = NaN and lse = 0."""

    name = "nan_on_hidden_rows"

    def forward(self, q, k, v, *, causal, scale, mask=None, softcap=None):
        out, lse = super().forward(q, k, v, causal=causal, scale=scale, mask=mask, softcap=softcap)
        if mask is not None:
            hidden = ~mask.any(dim=1)  # (q rows,)
            out = out.masked_fill(hidden.view(1, -1, 1, 1), float("nan"))
            lse = lse.masked_fill(hidden.view(1, 1, -1), 0.0)
        return out, lse


def test_a_block_that_hides_a_row_adds_nothing_even_if_it_wrote_nan():
    acc = PartialAttention(torch.empty(1, 3, 2, 4), torch.float32)
    out = torch.randn(1, 3, 2, 4)
    lse = torch.randn(1, 2, 3)
    acc.add(out, lse)
    nan_out = torch.full((1, 3, 2, 4), float("nan"))
    acc.add(nan_out, torch.full((1, 2, 3), float("-inf")))  # hides every row
    assert torch.equal(acc.out, out) and torch.equal(acc.lse, lse)
    # a row no block ever sees: out 0, lse -inf (as flash-attn reports it), never NaN
    fresh = PartialAttention(torch.empty(1, 3, 2, 4), torch.float32)
    fresh.add(nan_out, torch.full((1, 2, 3), float("-inf")))
    assert torch.equal(fresh.out, torch.zeros(1, 3, 2, 4))
    assert torch.isneginf(fresh.lse).all()


@pytest.mark.parametrize("world", [2, 4])
def test_ring_over_short_documents_striped_with_a_kernel_writing_nan_in_hidden_rows(world):
    """Every rank's ring steps (the plan's exact schedule) on one process: short packed
    documents under the striped layout leave rows of many blocks fully hidden. fp64 inputs:
    the result must match the float64 reference to rounding (1e-10)."""
    torch.manual_seed(0)
    seqlen, heads, kv_heads, dim = 32, 2, 1, 8
    cu = torch.tensor([0, 3, 5, 12, 13, 21, 32], dtype=torch.int32)
    q = torch.randn(1, seqlen, heads, dim, dtype=torch.float64)
    k, v = (torch.randn(1, seqlen, kv_heads, dim, dtype=torch.float64) for _ in range(2))
    doc = torch.repeat_interleave(torch.arange(len(cu) - 1), (cu[1:] - cu[:-1]).long())
    ref_out, ref_lse, *_ = reference_attention(q, k, v, torch.zeros_like(q), causal=True,
                                               mask=doc[:, None] == doc[None, :])
    kernel, scale = NaNOnHiddenRows(), 1 / math.sqrt(dim)
    held = [held_indices("striped", seqlen, world, r) for r in range(world)]
    hidden_rows = 0
    for rank in range(world):
        plan = AttentionPlan("ring", "striped", 1, seqlen // world, ring_size=world,
                             ring_rank=rank, cu_seqlens=cu, device="cpu")
        acc = PartialAttention(q[:, held[rank]], torch.float64)
        for step, tasks in enumerate(plan.ring_steps(causal=True)):
            src = held[(rank - step) % world]
            hidden_rows += sum(int((~t.mask.any(dim=1)).sum()) for t in tasks if t.mask is not None)
            attend_blocks(kernel, tasks, q[:, held[rank]], k[:, src], v[:, src], scale, acc)
        assert not acc.out.isnan().any(), f"rank {rank}: NaN leaked into the merged output"
        assert rel_err(acc.out, ref_out[:, held[rank]]) < 1e-10
        assert rel_err(acc.lse, ref_lse[:, :, held[rank]]) < 1e-10
    assert hidden_rows > 0, "the case must have blocks that hide rows entirely"
