"""Ring attention: exact attention over a sequence sharded across a process group.

Each rank keeps its Q shard; K/V shards travel around the ring. At step i rank r holds
the K/V of rank (r - i) mod P, computes the block pairs that are visible (the layout's
causal structure, narrowed by documents/windows: ``AttentionPlan.ring_steps``), and merges them into
fp32 accumulators (``PartialAttention``). The next K/V block is posted before the
current one is computed, so transfer overlaps compute (double buffered: two receive
buffers alternate). When masks leave the last steps empty on every rank, the ring stops
early instead of passing blocks nobody uses. Which blocks each step computes, and how many
steps run, come from the step's ``AttentionPlan`` (``ringattn.plan``): no collective and no
host sync here.

Backward runs the same ring with the saved final out/lse: dq accumulates locally, while
each K/V block travels together with its fp32 dK/dV accumulators; after the last step
each accumulator is sent straight back to the rank that owns its K/V.

Sinks (GPT-OSS) are folded into the finished rows once, after the last step
(``PartialAttention.add_sinks``); backward runs the kernels with that final out'/lse' and
adds d sinks of this rank's rows (``merge.sinks_grad``). Softcap goes to the kernels.
"""
from __future__ import annotations

import torch

from . import profile
from .blocks import accumulate_grads, attend_blocks, backward_inputs, record_step
from .comm import RingComm
from .kernels import get_backend
from .kernels.base import accumulation_dtype
from .merge import PartialAttention, sinks_grad
from .plan import prologue


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, sinks, scale, steps, group, backend, softcap):
        comm = RingComm(group)
        kernel = get_backend(backend, q, softcap=softcap)
        acc = PartialAttention(q, accumulation_dtype(q.dtype), v.shape[-1])
        k_cur, v_cur = k.contiguous(), v.contiguous()
        spare = None  # the receive buffers not in use this step (double buffering)
        for step, tasks in enumerate(steps):
            pending = comm.exchange([k_cur, v_cur], out=spare) if step + 1 < len(steps) else None
            record_step(tasks, q, k_cur)
            with profile.timed("compute_s", q.device):
                attend_blocks(kernel, tasks, q, k_cur, v_cur, scale, acc, softcap)
            if pending is not None:
                # The buffers we just computed on become next step's receive buffers,
                # except k/v themselves (the caller's tensors), which are never written.
                spare = [k_cur, v_cur] if step > 0 else None
                k_cur, v_cur = pending.wait()
        if sinks is not None:
            acc.add_sinks(sinks)  # once, on the complete rows
        out = acc.out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, acc.lse, sinks)
        ctx.set_materialize_grads(False)
        ctx.scale, ctx.steps, ctx.group, ctx.backend = scale, steps, group, backend
        ctx.softcap = softcap
        return out, acc.lse

    @staticmethod
    def backward(ctx, dout, dlse):
        dout, (q, k, v, out, lse, sinks) = backward_inputs(ctx, dout, dlse, "ring_attention")
        comm = RingComm(ctx.group)
        kernel = get_backend(ctx.backend, q, softcap=ctx.softcap)
        acc_dtype = accumulation_dtype(q.dtype)
        dq = torch.zeros(q.shape, dtype=acc_dtype, device=q.device)
        dk = torch.zeros(k.shape, dtype=acc_dtype, device=k.device)
        dv = torch.zeros(v.shape, dtype=acc_dtype, device=v.device)
        k_cur, v_cur = k.contiguous(), v.contiguous()
        dkv_pending = None
        dk_step = dv_step = None  # one step's dK/dV, added to the accumulators when they arrive
        spare = None  # double-buffered K/V receives, as in forward
        n_steps = len(ctx.steps)
        for step, tasks in enumerate(ctx.steps):
            kv_pending = comm.exchange([k_cur, v_cur], out=spare) if step + 1 < n_steps else None
            with profile.timed("compute_s", q.device):
                if dkv_pending is None:  # step 0: the accumulators of our own K/V are here
                    accumulate_grads(kernel, tasks, dout, q, k_cur, v_cur, out, lse, ctx.scale,
                                     dq, dk, dv, ctx.softcap)
                else:  # into this step's buffers while the held block's accumulators travel
                    if dk_step is None:
                        dk_step, dv_step = torch.zeros_like(dk), torch.zeros_like(dv)
                    else:
                        dk_step.zero_()
                        dv_step.zero_()
                    accumulate_grads(kernel, tasks, dout, q, k_cur, v_cur, out, lse, ctx.scale,
                                     dq, dk_step, dv_step, ctx.softcap)
            if dkv_pending is not None:
                # The accumulators of the K/V block we hold arrive from the previous rank.
                dk, dv = dkv_pending.wait()
                dk += dk_step
                dv += dv_step
            if step + 1 < n_steps:
                dkv_pending = comm.exchange([dk, dv])
            elif n_steps > 1:
                # We hold the K/V of rank (r - n_steps + 1): send its gradients home directly
                # (the next hop when the ring went all the way round).
                dk, dv = comm.exchange([dk, dv], shift=1 - n_steps).wait()
            if kv_pending is not None:
                spare = [k_cur, v_cur] if step > 0 else None  # never write the caller's k/v
                k_cur, v_cur = kv_pending.wait()
        dsinks = None if sinks is None else sinks_grad(dout, out, lse, sinks)
        return (dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dsinks,
                None, None, None, None, None, None)


def run_ring(q, k, v, *, steps, scale, group, backend, sinks=None, softcap=None):
    """Ring attention of checked shards along ``steps`` (``AttentionPlan.ring_steps``):
    -> (out in q's dtype, fp32 lse). For strategies built on the ring (hybrid)."""
    return _RingAttention.apply(q, k, v, sinks, scale, steps, group, backend, softcap)


def ring_attention(q, k, v, *, causal=False, softmax_scale=None, layout="zigzag", group=None,
                   backend="auto", return_lse=False, cu_seqlens=None, window_size=(-1, -1),
                   dropout_p=0.0, sinks=None, softcap=None, plan=None, mask=None):
    """Exact attention of this rank's query shard over the whole sharded sequence.

    q: (batch, local_seqlen, heads, head_dim); k, v: (batch, local_seqlen, kv_heads, head_dim),
    each rank's shard in ``layout`` order (see ``ringattn.shard``). ``group``: the process
    group forming the ring (default: the world). ``cu_seqlens``: int32 cumulative document
    lengths of the full packed sequence (batch 1), the same on every rank: attention stays
    within documents. ``window_size=(left, right)``: query i sees keys i-left..i+right
    (-1 = unbounded), as in flash-attn. ``sinks``: (heads,) learned per-head logits that
    join every row's softmax with no value (GPT-OSS), any float dtype, fp32 math; their
    gradient is this rank's rows' share (the gradient reduction sums the ranks).
    ``softcap``: scores -> softcap * tanh(scores / softcap) before the softmax (Gemma 2).
    ``mask``: a ``ringattn.RangeMask`` over the full sequence, the whole visibility rule
    (then causal=False, no window_size, no cu_seqlens); queries it hides entirely get
    out 0 and lse -inf.
    Returns out shaped like q (q's dtype), and with ``return_lse`` also the fp32
    log-sum-exp (batch, heads, local_seqlen), sinks included.

    ``plan``: this step's ``AttentionPlan`` (``SequenceParallel.prepare``), which carries
    cu_seqlens and the cross-rank checks; without one, each call checks (one all-gather).
    """
    plan, scale, _ = prologue("ring attention", q, k, v, strategy="ring", layout=layout,
                              causal=causal, window_size=window_size, cu_seqlens=cu_seqlens,
                              dropout_p=dropout_p, backend=backend, softmax_scale=softmax_scale,
                              plan=plan, sinks=sinks, softcap=softcap, ring_group=group,
                              mask=mask)
    out, lse = run_ring(q, k, v, steps=plan.ring_steps(causal, window_size, mask), scale=scale,
                        group=group, backend=backend, sinks=sinks, softcap=softcap)
    return (out, lse) if return_lse else out
