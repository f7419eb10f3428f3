"""What attention keeps in memory: block gradients one task at a time, and the all-gather
strategy's gathered K/V never saved for backward.

Every strategy's backward computes each block's (dq, dk, dv) and adds it into fp32
accumulators before the next block is computed: a block's gradients must be gone when the
kernel is called for the next one (checked with weak references to what the kernel returned).
The all-gather strategy saves only this rank's K/V shard for backward and gathers the
sequence's K/V again there: nothing the size of the whole sequence stays between a layer's
forward and its backward (checked with saved-tensor hooks). Gradients against float64.
"""
from __future__ import annotations

import weakref

import pytest
import torch

import ringattn
from ringattn import RangeMask
from ringattn.kernels.math import MathBackend
from tests.distributed import run_distributed
from tests.reference import reference_attention, rel_err
from tests.test_range_masks import dense_of

SEQLEN = 64
# prefix-LM documents: full and causal pieces, so several kernel calls even in one sequence
MASK = RangeMask.prefix_lm(torch.tensor([0, 7, 30, 31, 64], dtype=torch.int32), torch.tensor([3, 10, 1, 12]))


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, SEQLEN, 4, 8, generator=g, dtype=torch.float64)
    k, v = (torch.randn(1, SEQLEN, 2, 8, generator=g, dtype=torch.float64) for _ in range(2))
    dout = torch.randn(1, SEQLEN, 4, 8, generator=g, dtype=torch.float64)
    return q, k, v, dout


def _watch_block_grads(monkeypatch_target=MathBackend):
    """Wrap the math kernel's backward: record, at each call from a strategy, how many
    tensors returned by its earlier calls are still alive (the kernel's own per-segment
    calls of a varlen block are not counted)."""
    returned, alive_at_call, depth = [], [], [0]
    original = monkeypatch_target.backward

    def backward(self, *args, **kwargs):
        outer = depth[0] == 0
        if outer:
            alive_at_call.append(sum(r() is not None for r in returned))
        depth[0] += 1
        try:
            grads = original(self, *args, **kwargs)
        finally:
            depth[0] -= 1
        if outer:
            returned.extend(weakref.ref(g) for g in grads)
        return grads

    monkeypatch_target.backward = backward
    return alive_at_call, lambda: setattr(monkeypatch_target, "backward", original)


def _run(rank, world, strategy):
    alive_at_call, restore = _watch_block_grads()
    try:
        q, k, v, dout = _inputs()
        ref = reference_attention(q, k, v, dout, causal=False, mask=dense_of(MASK))
        sp = ringattn.SequenceParallel(strategy, "zigzag", backend="math")
        ql, kl, vl = (sp.shard(t).requires_grad_() for t in (q, k, v))
        out = sp.attention(ql, kl, vl, mask=MASK)
        out.backward(sp.shard(dout))
        errs = {n: rel_err(g, sp.shard(w)) for n, g, w in
                zip(("out", "dq", "dk", "dv"), (out, ql.grad, kl.grad, vl.grad), (ref[0], *ref[2:5]))}
        return alive_at_call, errs
    finally:
        restore()


def _check(results):
    for rank, (alive_at_call, errs) in enumerate(results):
        assert len(alive_at_call) > 1, (rank, alive_at_call)  # several blocks: the check means something
        assert max(alive_at_call) == 0, f"rank {rank}: earlier blocks' gradients alive at kernel calls: {alive_at_call}"
        assert all(e <= 1e-12 for e in errs.values()), (rank, errs)


def test_local_attention_accumulates_block_gradients_one_task_at_a_time():
    _check([_run(0, 1, "ring")])  # one process: the local attention (Ulysses' and all-gather's core)


@pytest.mark.parametrize("strategy", ["ring", "allgather", "ulysses"])
def test_strategies_accumulate_block_gradients_one_task_at_a_time(strategy):
    _check(run_distributed(_run, 2, strategy))


def _saved(rank, world, layout, checkpointed):
    """Shapes of every tensor saved for backward by one all-gather attention call, and its
    gradients' errors against float64."""
    q, k, v, dout = _inputs(1)
    ref = reference_attention(q, k, v, dout, causal=True)
    sp = ringattn.SequenceParallel("allgather", layout)
    ql, kl, vl = (sp.shard(t).requires_grad_() for t in (q, k, v))
    shapes = []

    def pack(t):
        shapes.append(tuple(t.shape))
        return t

    def attend(a, b, c):
        return sp.attention(a, b, c, causal=True)

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        if checkpointed:
            out = torch.utils.checkpoint.checkpoint(attend, ql, kl, vl, use_reentrant=False)
        else:
            out = attend(ql, kl, vl)
    out.backward(sp.shard(dout))
    errs = {n: rel_err(g, sp.shard(w)) for n, g, w in
            zip(("out", "dq", "dk", "dv"), (out, ql.grad, kl.grad, vl.grad), (ref[0], *ref[2:5]))}
    return shapes, errs


@pytest.mark.parametrize("layout", ["zigzag", pytest.param("contiguous", marks=pytest.mark.slow),
                                    pytest.param("striped", marks=pytest.mark.slow)])
def test_allgather_saves_only_the_local_shard_for_backward(layout):
    world = 2
    for checkpointed in (False, True):
        for rank, (shapes, errs) in enumerate(run_distributed(_saved, world, layout, checkpointed)):
            assert shapes, "nothing saved: the hook saw no tensor"
            seq_dims = [s[1] for s in shapes if len(s) == 4]  # (b, tokens, heads, d)
            assert max(seq_dims) == SEQLEN // world, (rank, checkpointed, shapes)
            assert all(e <= 1e-12 for e in errs.values()), (rank, checkpointed, errs)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_sdpa_wide_bottom_right_causal_block_builds_no_bias(monkeypatch, dtype):
    """All-gather's causal rows against every earlier key: a block of n queries and m > n keys
    under window (-1, 0). sdpa runs it as full keys + a top-left causal square, never a
    (n, m) bias (O(local tokens x sequence) memory); out, lse and gradients against float64."""
    from ringattn.kernels import sdpa

    def no_bias(mask, q, k=None, window=None, align=1):
        assert mask is None and window is None, "a bias was built"
        return None

    monkeypatch.setattr(sdpa, "_additive", no_bias)
    g = torch.Generator().manual_seed(3)
    n, m = 5, 23
    q = torch.randn(1, n, 4, 16, generator=g, dtype=torch.float64)
    k, v = (torch.randn(1, m, 2, 16, generator=g, dtype=torch.float64) for _ in range(2))
    dout = torch.randn(1, n, 4, 16, generator=g, dtype=torch.float64)
    visible = torch.arange(m)[None, :] <= torch.arange(n)[:, None] + (m - n)  # bottom-right causal
    # reference over the block: keys are the whole (m) sequence, queries its last n rows
    pad = torch.zeros(1, m - n, 4, 16, dtype=torch.float64)
    full_mask = torch.ones(m, m, dtype=torch.bool)
    full_mask[m - n:] = visible
    ref = reference_attention(torch.cat([pad, q], 1), k, v, torch.cat([pad, dout], 1), causal=False, mask=full_mask)
    kern = sdpa.SdpaBackend()
    qc, kc, vc, dc = (t.to(dtype) for t in (q, k, v, dout))
    out, lse = kern.forward(qc, kc, vc, causal=False, scale=16 ** -0.5, window=(-1, 0))
    dq, dk, dv = kern.backward(dc, qc, kc, vc, out, lse, causal=False, scale=16 ** -0.5, window=(-1, 0))
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert rel_err(out, ref[0][:, m - n:]) <= tol
    assert rel_err(lse, ref[1][:, :, m - n:]) <= tol
    assert rel_err(dq, ref[2][:, m - n:]) <= tol
    assert rel_err(dk, ref[3]) <= tol and rel_err(dv, ref[4]) <= tol
