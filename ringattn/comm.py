"""Communication: the ring pass, and the sequence gather used by ``unshard``.

The ring is a process group's ranks in group order; rank i sends to i+1 and receives
from i-1. ``RingComm.exchange`` posts all sends and receives of a step at once
(``batch_isend_irecv``) and returns immediately, so the caller computes on the current
block while the next one travels; ``Pending.wait`` then hands over the received tensors.
There is no barrier per step: a rank only ever waits for its own receives.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from . import profile


def group_size(group=None) -> int:
    if not dist.is_available() or not dist.is_initialized():
        return 1
    return dist.get_world_size(group)


def group_rank(group=None) -> int:
    if not dist.is_available() or not dist.is_initialized():
        return 0
    return dist.get_rank(group)


class Pending:
    def __init__(self, works, received):
        self._works, self._received = works, received

    def wait(self) -> list[torch.Tensor]:
        with profile.timed("wait_s", self._received[0].device):
            for w in self._works:
                w.wait()
        return self._received


class RingComm:
    def __init__(self, group=None):
        self.group = group
        self.size = group_size(group)
        self.rank = group_rank(group)

    def _global(self, offset: int) -> int:
        return dist.get_global_rank(self.group or dist.group.WORLD, (self.rank + offset) % self.size)

    def exchange(self, tensors: list[torch.Tensor], out: list[torch.Tensor] | None = None,
                 shift: int = 1) -> Pending:
        """Send ``tensors`` to rank + shift; receive same-shaped ones from rank - shift.

        ``out``: buffers to receive into (double buffering); fresh ones when None.
        """
        received = out if out is not None else [torch.empty_like(t) for t in tensors]
        send_to, recv_from = self._global(shift), self._global(-shift)
        ops = [dist.P2POp(dist.isend, t, send_to, self.group) for t in tensors]
        ops += [dist.P2POp(dist.irecv, r, recv_from, self.group) for r in received]
        prof = profile.active()
        if prof is not None:
            prof.bytes_sent += sum(t.numel() * t.element_size() for t in tensors)
        return Pending(dist.batch_isend_irecv(ops), received)


def max_over_group(value: int, group=None, device=None) -> int:
    """The largest ``value`` over the group's ranks (one tiny all-reduce)."""
    if group_size(group) == 1:
        return value
    on_device = device is not None and dist.get_backend(group) != "gloo"
    t = torch.tensor([value], dtype=torch.int64, device=device if on_device else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return int(t.item())


class _GatherSequence(torch.autograd.Function):
    """All-gather along ``dim`` in rank order; backward reduce-scatters (sums) the gradient."""

    @staticmethod
    def forward(ctx, x, dim, group):
        ctx.dim, ctx.group = dim, group
        parts = [torch.empty_like(x) for _ in range(group_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=dim)

    @staticmethod
    def backward(ctx, grad):
        size, rank = group_size(ctx.group), group_rank(ctx.group)
        chunks = [c.contiguous() for c in grad.chunk(size, dim=ctx.dim)]
        if dist.get_backend(ctx.group) == "gloo":
            # gloo has no reduce-scatter: sum the whole gradient, keep our chunk.
            full = grad.contiguous()
            dist.all_reduce(full, group=ctx.group)
            return full.chunk(size, dim=ctx.dim)[rank].contiguous(), None, None
        mine = torch.empty_like(chunks[rank])
        dist.reduce_scatter(mine, chunks, group=ctx.group)
        return mine, None, None


def gather_sequence(x_local: torch.Tensor, dim: int, group=None) -> torch.Tensor:
    """Concatenate every rank's shard along ``dim`` in rank order (differentiable).

    Backward sums each rank's gradient of the full tensor into the owner's shard, i.e.
    the gradient of the sum of all ranks' losses.
    """
    if group_size(group) == 1:
        return x_local
    return _GatherSequence.apply(x_local, dim % x_local.dim(), group)
