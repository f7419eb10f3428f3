"""Communication: the ring pass, the Ulysses all-to-all (any head split), and the sequence gather used by ``unshard``.

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


def group_device(group=None) -> torch.device | None:
    """The device ``group``'s collectives take: NCCL, the current CUDA device (NCCL refuses
    host tensors); any other backend (gloo, test backends), the host. None without
    torch.distributed (no group, no collective)."""
    if not dist.is_available() or not dist.is_initialized():
        return None
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


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


def all_gather_sequence(x: torch.Tensor, dim: int, group=None) -> torch.Tensor:
    """Every rank's ``x`` concatenated along ``dim`` in rank order (not differentiable)."""
    size = group_size(group)
    if size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(size)]
    _count_sent(x, size)
    with profile.timed("wait_s", x.device):
        dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


def reduce_scatter_sequence(full: torch.Tensor, dim: int, group=None) -> torch.Tensor:
    """This rank's chunk along ``dim`` of the sum over ranks of ``full`` (the inverse
    direction of ``all_gather_sequence``; not differentiable)."""
    size, rank = group_size(group), group_rank(group)
    if size == 1:
        return full
    chunks = [c.contiguous() for c in full.chunk(size, dim=dim)]
    _count_sent(chunks[rank], size)
    if dist.get_backend(group) == "gloo":
        # gloo has no reduce-scatter: sum the whole tensor, keep our chunk.
        whole = full.contiguous()
        with profile.timed("wait_s", full.device):
            dist.all_reduce(whole, group=group)
        return whole.chunk(size, dim=dim)[rank].contiguous()
    mine = torch.empty_like(chunks[rank])
    with profile.timed("wait_s", full.device):
        dist.reduce_scatter(mine, chunks, group=group)
    return mine


class _GatherSequence(torch.autograd.Function):
    """All-gather along ``dim`` in rank order; backward reduce-scatters (sums) the gradient."""

    @staticmethod
    def forward(ctx, x, dim, group):
        ctx.dim, ctx.group = dim, group
        return all_gather_sequence(x, dim, group)

    @staticmethod
    def backward(ctx, grad):
        return reduce_scatter_sequence(grad, ctx.dim, ctx.group), None, None


def _count_sent(shard: torch.Tensor, size: int) -> None:
    """An all-gather or reduce-scatter of ``shard``-sized pieces: each rank sends P - 1 of
    them (the ring algorithm's bytes, whatever the backend runs)."""
    prof = profile.active()
    if prof is not None:
        prof.bytes_sent += (size - 1) * shard.numel() * shard.element_size()


def gather_sequence(x_local: torch.Tensor, dim: int, group=None) -> torch.Tensor:
    """Concatenate every rank's shard along ``dim`` in rank order (differentiable).

    Backward sums each rank's gradient of the full tensor into the owner's shard, i.e.
    the gradient of the sum of all ranks' losses.
    """
    if group_size(group) == 1:
        return x_local
    return _GatherSequence.apply(x_local, dim % x_local.dim(), group)


def _all_reduce_counted(x: torch.Tensor, group) -> torch.Tensor:
    """Sum ``x`` over the group (a new tensor); counts the ring algorithm's bytes, 2 (P - 1) / P
    of it per rank, whatever the backend runs."""
    out = x.contiguous().clone()
    prof = profile.active()
    size = group_size(group)
    if prof is not None:
        prof.bytes_sent += 2 * (size - 1) * out.numel() * out.element_size() // size
    with profile.timed("wait_s", out.device):
        dist.all_reduce(out, group=group)
    return out


class _SumOverRanks(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _all_reduce_counted(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce_counted(grad, ctx.group), None


def sum_over_ranks(x: torch.Tensor, group=None) -> torch.Tensor:
    """Every rank's ``x`` summed, on every rank (differentiable: each rank's gradient of the
    sum is every rank's gradient summed, i.e. the gradient of the sum of all ranks' losses)."""
    if group_size(group) == 1:
        return x
    return _SumOverRanks.apply(x, group)


def _exchange(chunks: list[torch.Tensor], recv_numels: list[int], group) -> list[torch.Tensor]:
    """Send ``chunks[j]`` to rank j and receive ``recv_numels[j]`` elements from each rank j:
    one ``all_to_all_single`` with uneven split sizes over flat buffers (gloo and NCCL)."""
    like = chunks[0]
    send = torch.cat([c.reshape(-1) for c in chunks])
    received = torch.empty(sum(recv_numels), dtype=like.dtype, device=like.device)
    prof = profile.active()
    if prof is not None:  # what leaves this rank: every chunk but our own
        me = group_rank(group)
        prof.bytes_sent += sum(c.numel() for j, c in enumerate(chunks) if j != me) * like.element_size()
    with profile.timed("wait_s", like.device):
        dist.all_to_all_single(received, send, output_split_sizes=list(recv_numels),
                               input_split_sizes=[c.numel() for c in chunks], group=group)
    return list(received.split(list(recv_numels)))


def _heads_to_sequence(x, ranges, group):
    b, s_loc, _, d = x.shape
    lo, hi = ranges[group_rank(group)]
    chunks = [x[:, :, a:z] for a, z in ranges]
    parts = _exchange(chunks, [b * s_loc * (hi - lo) * d] * len(ranges), group)
    return torch.cat([p.view(b, s_loc, hi - lo, d) for p in parts], dim=1)


def _sequence_to_heads(y, ranges, heads, group):
    """Inverse direction; overlapping ``ranges`` sum into the heads they share."""
    b, s, n, d = y.shape
    size = len(ranges)
    s_loc = s // size
    parts = _exchange(list(y.split(s_loc, dim=1)), [b * s_loc * (z - a) * d for a, z in ranges], group)
    out = torch.zeros(b, s_loc, heads, d, dtype=y.dtype, device=y.device)
    for (a, z), p in zip(ranges, parts):
        out[:, :, a:z] += p.view(b, s_loc, z - a, d)
    return out


class _HeadsToSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, ranges, group):
        ctx.ranges, ctx.group, ctx.heads = ranges, group, x.shape[2]
        return _heads_to_sequence(x, ranges, group)

    @staticmethod
    def backward(ctx, grad):
        return _sequence_to_heads(grad.contiguous(), ctx.ranges, ctx.heads, ctx.group), None, None


class _SequenceToHeads(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, ranges, group):
        ctx.ranges, ctx.group = ranges, group
        return _sequence_to_heads(y, ranges, ranges[-1][1], group)

    @staticmethod
    def backward(ctx, grad):
        return _heads_to_sequence(grad.contiguous(), ctx.ranges, ctx.group), None, None


def heads_to_sequence(x: torch.Tensor, ranges, group=None) -> torch.Tensor:
    """(b, s/u, H, d) sequence shards -> (b, s, n_r, d): rank r receives heads ``ranges[r]``
    ([lo, hi), any sizes, may overlap) of every rank's tokens, in rank order (differentiable;
    a head sent to several ranks gets their gradients summed)."""
    if group_size(group) == 1:
        lo, hi = ranges[0]
        return x[:, :, lo:hi]
    return _HeadsToSequence.apply(x, tuple(ranges), group)


def sequence_to_heads(y: torch.Tensor, ranges, group=None) -> torch.Tensor:
    """Inverse of ``heads_to_sequence`` for ``ranges`` that partition the heads in order:
    (b, s, n_r, d) -> (b, s/u, H, d)."""
    if group_size(group) == 1:
        return y
    return _SequenceToHeads.apply(y, tuple(ranges), group)
