"""Block-level attention helpers shared by every strategy (ring, Ulysses, hybrid).

A strategy decides *which* (q rows, k rows) block pairs to compute (``BlockTask``s from
``layouts`` / ``masking``); these helpers run them through a kernel and merge the results
(forward), or add each block's gradients, computed from the final out/lse, into the
strategy's accumulators one block at a time (backward).
"""
from __future__ import annotations

import torch

from . import profile
from .kernels import choice, get_backend
from .merge import PartialAttention


def _kernel_for(kernel, task, q, softcap):
    """The strategy's kernel if it can express the block (dense mask, window band, packed
    sequences: its feature flags), else the fastest one that can (and takes the softcap)."""
    needs = dict(mask=task.mask is not None, window=task.window is not None,
                 varlen=task.segments is not None)
    if ((not needs["mask"] or kernel.supports_mask) and (not needs["window"] or kernel.supports_window)
            and (not needs["varlen"] or kernel.supports_varlen)):
        return kernel
    return get_backend("auto", q, softcap=softcap, **needs)


def _block(task):
    """The kernel keywords that describe ``task``'s visible part."""
    return dict(causal=task.causal, mask=task.mask, window=task.window, segments=task.segments,
                cu_seqlens=task.cu_seqlens)


def attend_blocks(kernel, tasks, q, k, v, scale, acc: PartialAttention, softcap=None) -> None:
    """Run ``tasks`` (q rows x k/v rows) and merge each block's (out, lse) into ``acc``."""
    prof = profile.active()
    for t in tasks:
        chosen = _kernel_for(kernel, t, q, softcap)
        choice.note(chosen.name, t.kind)
        if prof is not None:
            prof.count_block(chosen.name, t.kind)
        o, lse = chosen.forward(q[:, t.q_rows], k[:, t.k_rows], v[:, t.k_rows], scale=scale,
                                softcap=softcap, **_block(t))
        if t.mask is not None:
            # Rows this block hides entirely contribute nothing (fused kernels
            # report lse = 0 there, which the merge would weigh).
            lse = lse.masked_fill(~t.mask.any(dim=1).to(lse.device), float("-inf"))
        acc.add(o, lse, t.q_rows)


def accumulate_grads(kernel, tasks, dout, q, k, v, out, lse, scale, dq, dk, dv, softcap=None) -> None:
    """Add each task's block gradients into the accumulators ``dq`` (q's rows) and ``dk``,
    ``dv`` (k's rows), one task at a time: only one block's gradients exist at once. From
    the final out and lse of the whole rows (with sinks: the out' and lse' that include them)."""
    for t in tasks:
        dq_b, dk_b, dv_b = _kernel_for(kernel, t, q, softcap).backward(
            dout[:, t.q_rows], q[:, t.q_rows], k[:, t.k_rows], v[:, t.k_rows], out[:, t.q_rows],
            lse[:, :, t.q_rows], scale=scale, softcap=softcap, **_block(t))
        dq[:, t.q_rows] += dq_b
        dk[:, t.k_rows] += dk_b
        dv[:, t.k_rows] += dv_b
        del dq_b, dk_b, dv_b  # gone before the next block's are made


def record_step(plan_step, q, k):
    """Count one step's kernel calls and score pairs in the active ``RingProfile`` (if any)."""
    prof = profile.active()
    if prof is None:
        return
    b, sq, h, _ = q.shape
    n = sum(b * h * t.scores(sq, k.shape[1]) for t in plan_step)
    prof.kernel_calls += len(plan_step)
    prof.scores += n
    prof.ring_steps += 1


def backward_inputs(ctx, dout, dlse, who):
    """dout (zeros if unused) and the saved tensors of an attention Function whose forward
    returned (out, lse); gradients through lse are refused."""
    if dlse is not None:
        raise RuntimeError(
            f"{who}(return_lse=True): gradients through the returned lse are not "
            "supported; detach it (lse.detach()) before using it in a loss"
        )
    saved = ctx.saved_tensors
    return (torch.zeros_like(saved[3]) if dout is None else dout), saved
