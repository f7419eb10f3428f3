"""Rows a block's mask hides entirely add exactly nothing to the merge, whatever the kernel
wrote there: fused GPU kernels promise nothing for such rows (NaN, garbage), and 0 * NaN is
NaN. Proven on CPU with a kernel that writes NaN (out) and 0 (lse, as fused kernels report)
into every row its mask hides entirely, through the ring's exact per-rank schedule; and with
kernels whose own block description hides rows and that write lse +inf (flash-attn's
empty row), -inf or NaN there.
"""
from __future__ import annotations

import math

import pytest
import torch

from ringattn.blocks import attend_blocks
from ringattn.kernels.base import accumulation_dtype
from ringattn.kernels.math import MathBackend
from ringattn.layouts import ALL, BlockTask
from ringattn.merge import PartialAttention
from ringattn.plan import AttentionPlan
from ringattn.sharding import held_indices
from tests.reference import reference_attention, rel_err


class NaNOnHiddenRows(MathBackend):
    """The math kernel, but rows its mask hides entirely get out = NaN and lse = 0."""

    name = "nan_on_hidden_rows"

    def forward(self, q, k, v, *, causal, scale, mask=None, softcap=None, **block):
        out, lse = super().forward(q, k, v, causal=causal, scale=scale, mask=mask, softcap=softcap,
                                   **block)
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


class WritesOnHiddenRows(MathBackend):
    """A kernel whose own block description hides rows, as flash-attn's varlen call does for
    a segment with no key: the block's dense ``visible`` (q rows, k rows) is the kernel's,
    not the task's, so ``attend_blocks`` hands its (out, lse) to the merge untouched. Rows
    it hides get out = ``out_fill`` and lse = ``lse_fill``."""

    name = "writes_on_hidden_rows"

    def __init__(self, visible, out_fill, lse_fill):
        self.visible, self.out_fill, self.lse_fill = visible, out_fill, lse_fill

    def forward(self, q, k, v, *, causal, scale, mask=None, softcap=None, **block):
        assert mask is None
        out, lse = super().forward(q, k, v, causal=causal, scale=scale, mask=self.visible,
                                   softcap=softcap, **block)
        hidden = ~self.visible.any(dim=1)
        out = out.masked_fill(hidden.view(1, -1, 1, 1), self.out_fill)
        lse = lse.masked_fill(hidden.view(1, 1, -1), self.lse_fill)
        return out, lse


def virtual_ring(kernel, layout, world, cu, q, k, v, dense=False):
    """Every rank's ring steps (``AttentionPlan.ring_steps``: the exact schedule, masks on
    q's device) run in one process on full tensors -> [(out, lse, hidden rows) per rank]:
    rank r's shard attends the shard of rank (r - step) mod P at each step. ``dense``: each
    step one block of the whole shards with its dense mask instead (the schedule describes
    documents as bands and varlen sequences, which hide no row; a dense block hides every
    row of a document the other shard does not hold). ``dense="kernel"``: that mask is the
    kernel's own (``kernel`` is then a factory of a kernel from the step's mask), so no
    caller masks the lse of the rows it hides."""
    held = [held_indices(layout, q.shape[1], world, r, cu_seqlens=cu).to(q.device)
            for r in range(world)]
    results = []
    for rank in range(world):
        plan = AttentionPlan("ring", layout, 1, q.shape[1] // world, ring_size=world,
                             ring_rank=rank, cu_seqlens=cu, device=q.device)
        mine = q[:, held[rank]]
        acc, hidden = PartialAttention(mine, accumulation_dtype(q.dtype)), 0
        for step, tasks in enumerate(plan.ring_steps(causal=True)):
            src = held[(rank - step) % world]
            step_kernel = kernel
            if dense:
                rule = plan.mask(causal=True)
                visible = rule.dense(held[rank].cpu(), src.cpu()).to(q.device)
                tasks = [BlockTask(ALL, ALL, False, mask=visible)]
                if dense == "kernel":
                    step_kernel, tasks = kernel(visible), [BlockTask(ALL, ALL, False)]
                    hidden += int((~visible.any(dim=1)).sum())
            for t in tasks:
                if t.cu_seqlens is not None:
                    assert all(c.device == q.device for c in t.cu_seqlens), "varlen bounds too"
                if t.mask is not None:
                    assert t.mask.device == q.device, "the plan's masks live on the data's device"
                    hidden += int((~t.mask.any(dim=1)).sum())
            attend_blocks(step_kernel, tasks, mine, k[:, src], v[:, src], 1 / math.sqrt(q.shape[-1]),
                          acc)
        results.append((held[rank], acc.out, acc.lse, hidden))
    return results


def documents_case(device, dtype, seqlen=32):
    """Short packed documents (3, 2, 7, 1, 8, 11 tokens), GQA 2 -> 1, and the float64 reference."""
    torch.manual_seed(0)
    cu = torch.tensor([0, 3, 5, 12, 13, 21, seqlen], dtype=torch.int32)
    q = torch.randn(1, seqlen, 2, 8, dtype=torch.float64)
    k, v = (torch.randn(1, seqlen, 1, 8, dtype=torch.float64) for _ in range(2))
    doc = torch.repeat_interleave(torch.arange(len(cu) - 1), (cu[1:] - cu[:-1]).long())
    ref_out, ref_lse, *_ = reference_attention(q, k, v, torch.zeros_like(q), causal=True,
                                               mask=doc[:, None] == doc[None, :])
    return cu, [t.to(device, dtype) for t in (q, k, v)], ref_out, ref_lse


@pytest.mark.parametrize("world", [2, 4])
def test_ring_over_short_documents_striped_with_a_kernel_writing_nan_in_hidden_rows(world):
    """Short packed documents under the striped layout leave rows of many blocks fully
    hidden. fp64 inputs: the result must match the float64 reference to rounding (1e-10)."""
    cu, (q, k, v), ref_out, ref_lse = documents_case("cpu", torch.float64)
    results = virtual_ring(NaNOnHiddenRows(), "striped", world, cu, q, k, v, dense=True)
    for rank, (held, out, lse, _) in enumerate(results):
        assert not out.isnan().any(), f"rank {rank}: NaN leaked into the merged output"
        assert rel_err(out, ref_out[:, held]) < 1e-10
        assert rel_err(lse, ref_lse[:, :, held]) < 1e-10
    assert sum(r[3] for r in results) > 0, "the case must have blocks that hide rows entirely"


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("lse_fill", [float("inf"), float("-inf"), float("nan")])
@pytest.mark.parametrize("out_fill", [0.0, float("nan"), 1e30])
def test_ring_with_a_kernel_writing_non_finite_lse_in_rows_it_hides(world, lse_fill, out_fill):
    """A block row whose lse is +inf (flash-attn's row that sees no key: out 0, lse
    +INFINITY), -inf or NaN adds nothing to the merge, whatever its out holds; nothing
    outside the merge masks it. fp64: the ring equals the float64 reference to 1e-10."""
    cu, (q, k, v), ref_out, ref_lse = documents_case("cpu", torch.float64)
    results = virtual_ring(lambda visible: WritesOnHiddenRows(visible, out_fill, lse_fill),
                           "striped", world, cu, q, k, v, dense="kernel")
    for rank, (held, out, lse, _) in enumerate(results):
        assert torch.isfinite(out).all() and torch.isfinite(lse).all(), f"rank {rank}"
        assert rel_err(out, ref_out[:, held]) < 1e-10
        assert rel_err(lse, ref_lse[:, :, held]) < 1e-10
    assert sum(r[3] for r in results) > 0, "the case must have blocks that hide rows entirely"
