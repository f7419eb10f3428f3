"""Ring attention: exact attention over a sequence sharded across a process group.

Each rank keeps its Q shard; K/V shards travel around the ring, P steps in all. At step i
rank r holds the K/V of rank (r - i) mod P, computes the block pairs its layout says are
visible (``Layout.block_tasks``), and merges them into fp32 accumulators
(``PartialAttention``). The next K/V block is posted before the current one is computed,
so transfer overlaps compute (double buffered: two receive buffers alternate).

Backward runs the same ring with the saved final out/lse: dq accumulates locally, while
each K/V block travels together with its fp32 dK/dV accumulators, which arrive back home
after P hops.
"""
from __future__ import annotations

import math

import torch

from . import profile
from .comm import RingComm
from .inputs import check_qkv, check_same_on_all_ranks
from .kernels import get_backend
from .kernels.base import accumulation_dtype
from .layouts import get_layout
from .merge import PartialAttention


def _run_tasks(tasks, kernel_call):
    prof = profile.active()
    for task in tasks:
        kernel_call(task)
        if prof is not None:
            prof.kernel_calls += 1


def _count(prof, q, k, tasks):
    """Scores computed by ``tasks`` (a work measure for balance checks)."""
    if prof is None:
        return
    b, sq, h, _ = q.shape
    sk = k.shape[1]
    n = 0
    for t in tasks:
        rows = len(range(*t.q_rows.indices(sq)))
        cols = len(range(*t.k_rows.indices(sk)))
        n += b * h * (rows * cols if not t.causal else rows * (rows + 1) // 2 + rows * (cols - rows))
    prof.scores += n
    prof.per_step_scores.append(n)
    prof.ring_steps += 1


def backward_inputs(ctx, dout, dlse, who):
    """Saved (q, k, v, out, lse) and dout (zeros if unused) of an attention Function whose
    forward returned (out, lse); gradients through lse are refused."""
    if dlse is not None:
        raise RuntimeError(
            f"{who}(return_lse=True): gradients through the returned lse are not "
            "supported; detach it (lse.detach()) before using it in a loss"
        )
    q, k, v, out, lse = ctx.saved_tensors
    return (torch.zeros_like(out) if dout is None else dout), q, k, v, out, lse


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal, scale, layout, group, backend):
        comm = RingComm(group)
        kernel = get_backend(backend, q)
        acc = PartialAttention(q, accumulation_dtype(q.dtype))
        prof = profile.active()
        k_cur, v_cur = k.contiguous(), v.contiguous()
        spare = None  # the receive buffers not in use this step (double buffering)
        for step in range(comm.size):
            pending = None
            if step + 1 < comm.size:
                pending = comm.exchange([k_cur, v_cur], out=spare)
            src = (comm.rank - step) % comm.size
            tasks = layout.block_tasks(comm.rank, src, comm.size, q.shape[1], causal)
            _count(prof, q, k_cur, tasks)

            def call(t, k_cur=k_cur, v_cur=v_cur):
                o, lse = kernel.forward(q[:, t.q_rows], k_cur[:, t.k_rows], v_cur[:, t.k_rows],
                                        causal=t.causal, scale=scale)
                acc.add(o, lse, t.q_rows)

            with profile.timed("compute_s", q.device):
                _run_tasks(tasks, call)
            if pending is not None:
                # The buffers we just computed on become next step's receive buffers,
                # except k/v themselves (the caller's tensors), which are never written.
                spare = [k_cur, v_cur] if step > 0 else None
                k_cur, v_cur = pending.wait()
        out = acc.out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, acc.lse)
        ctx.set_materialize_grads(False)
        ctx.causal, ctx.scale, ctx.layout, ctx.group, ctx.backend = causal, scale, layout, group, backend
        return out, acc.lse

    @staticmethod
    def backward(ctx, dout, dlse):
        dout, q, k, v, out, lse = backward_inputs(ctx, dout, dlse, "ring_attention")
        comm = RingComm(ctx.group)
        kernel = get_backend(ctx.backend, q)
        acc_dtype = accumulation_dtype(q.dtype)
        dq = torch.zeros(q.shape, dtype=acc_dtype, device=q.device)
        dk = torch.zeros(k.shape, dtype=acc_dtype, device=k.device)
        dv = torch.zeros(v.shape, dtype=acc_dtype, device=v.device)
        k_cur, v_cur = k.contiguous(), v.contiguous()
        dkv_pending = None
        for step in range(comm.size):
            kv_pending = None
            if step + 1 < comm.size:
                kv_pending = comm.exchange([k_cur, v_cur])
            src = (comm.rank - step) % comm.size
            tasks = ctx.layout.block_tasks(comm.rank, src, comm.size, q.shape[1], ctx.causal)
            grads = []

            def call(t, k_cur=k_cur, v_cur=v_cur):
                grads.append((t, kernel.backward(
                    dout[:, t.q_rows], q[:, t.q_rows], k_cur[:, t.k_rows], v_cur[:, t.k_rows],
                    out[:, t.q_rows], lse[:, :, t.q_rows], causal=t.causal, scale=ctx.scale)))

            with profile.timed("compute_s", q.device):
                _run_tasks(tasks, call)
            if dkv_pending is not None:
                # The accumulators of the K/V block we hold arrive from the previous rank.
                dk, dv = dkv_pending.wait()
            for t, (dq_b, dk_b, dv_b) in grads:
                dq[:, t.q_rows] += dq_b
                dk[:, t.k_rows] += dk_b
                dv[:, t.k_rows] += dv_b
            if comm.size > 1:
                # After P hops, every accumulator is back with the rank that owns its K/V.
                dkv_pending = comm.exchange([dk, dv])
            if kv_pending is not None:
                k_cur, v_cur = kv_pending.wait()
        if dkv_pending is not None:
            dk, dv = dkv_pending.wait()
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None, None


def ring_attention(q, k, v, *, causal=False, softmax_scale=None, layout="zigzag", group=None,
                   backend="auto", return_lse=False, dropout_p=0.0):
    """Exact attention of this rank's query shard over the whole sharded sequence.

    q: (batch, local_seqlen, heads, head_dim); k, v: (batch, local_seqlen, kv_heads, head_dim),
    each rank's shard in ``layout`` order (see ``ringattn.shard``). ``group``: the process
    group forming the ring (default: the world). Returns out shaped like q (q's dtype), and
    with ``return_lse`` also the fp32 log-sum-exp (batch, heads, local_seqlen).
    """
    check_qkv(q, k, v, dropout_p)
    lay = get_layout(layout)
    if q.shape[1] != k.shape[1]:
        raise ValueError(
            f"ring attention needs equal local q and k/v lengths; got {q.shape[1]} and {k.shape[1]}"
        )
    get_backend(backend, q)  # fail early, before any communication, if it cannot run
    check_same_on_all_ranks(q, k, group)
    comm_size = RingComm(group).size
    lay.check_seqlen(q.shape[1] * comm_size, comm_size)
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    out, lse = _RingAttention.apply(q, k, v, causal, scale, lay, group, backend)
    return (out, lse) if return_lse else out
