"""Communication: the ring pass, the Ulysses all-to-all, and the sequence gather used by ``unshard``.

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


class _AllToAll(torch.autograd.Function):
    """Split ``x`` into P chunks along ``scatter_dim``, send chunk j to rank j, and
    concatenate the chunks received along ``gather_dim`` in rank order.

    Backward is the same exchange with the two dims swapped (the exact inverse).
    ``all_to_all_single`` on one contiguous (P, ...) buffer runs on gloo and NCCL alike.
    """

    @staticmethod
    def forward(ctx, x, scatter_dim, gather_dim, group):
        ctx.dims, ctx.group = (scatter_dim, gather_dim), group
        return _all_to_all(x, scatter_dim, gather_dim, group)

    @staticmethod
    def backward(ctx, grad):
        scatter_dim, gather_dim = ctx.dims
        return _all_to_all(grad, gather_dim, scatter_dim, ctx.group), None, None, None


def _all_to_all(x, scatter_dim, gather_dim, group):
    size = group_size(group)
    send = torch.stack(x.chunk(size, dim=scatter_dim))  # (P, ...), contiguous
    received = torch.empty_like(send)
    prof = profile.active()
    if prof is not None:  # what leaves this rank: every chunk but our own
        prof.bytes_sent += send.numel() * send.element_size() * (size - 1) // size
    with profile.timed("wait_s", x.device):
        dist.all_to_all_single(received, send, group=group)
    return torch.cat(received.unbind(0), dim=gather_dim)


def all_to_all(x: torch.Tensor, scatter_dim: int, gather_dim: int, group=None) -> torch.Tensor:
    """Differentiable all-to-all: scatter ``scatter_dim`` over the group, gather ``gather_dim``.

    ``x.shape[scatter_dim]`` must be a multiple of the group size. Ulysses uses it to trade
    a sequence shard of all heads for the whole sequence of a head shard, and back.
    """
    size = group_size(group)
    if size == 1:
        return x
    scatter_dim, gather_dim = scatter_dim % x.dim(), gather_dim % x.dim()
    if x.shape[scatter_dim] % size:
        raise ValueError(
            f"all_to_all: dim {scatter_dim} of size {x.shape[scatter_dim]} cannot be split "
            f"evenly over {size} ranks"
        )
    return _AllToAll.apply(x, scatter_dim, gather_dim, group)
