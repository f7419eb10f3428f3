"""Opt-in instrumentation of the ring loop: kernel calls, ring steps, communication waits.

    with ringattn.profile.RingProfile() as prof:
        out = ringattn.ring_attention(q, k, v, causal=True)
    prof.kernel_calls, prof.ring_steps, prof.wait_s, prof.compute_s, prof.scores
    prof.blocks   # {(backend, block kind): forward kernel calls}, e.g. ("flash_attn", "varlen")

Off by default (nothing is recorded). Host regions are timed with the host clock. Device
regions (CUDA) are timed with events recorded on the current -- compute -- stream around
each region and read once, when the profile exits: a region then measures what the compute
stream spent on it, and a ring transfer the compute stream waits for lands in ``wait_s``.
(Synchronising the whole device before each region instead would let the transfer finish
between regions, in neither bucket, and the wait share would read ~0.) The times are read
after the ``with`` block.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable

_ACTIVE: list["RingProfile"] = []


def cuda_events(device):
    """The default event factory: a timing CUDA event for CUDA regions, None (host clock)
    for any other device."""
    if device is None or device.type != "cuda":
        return None
    import torch

    return torch.cuda.Event(enable_timing=True)


@dataclass
class RingProfile:
    """Counters and times of the ring loop. ``events``: device -> an event with ``record()``,
    ``synchronize()`` and ``elapsed_time(end)`` in ms (``torch.cuda.Event``'s interface), or
    None to time that device's regions on the host clock; default ``cuda_events``."""

    kernel_calls: int = 0
    ring_steps: int = 0
    scores: int = 0  # query-key pairs computed (q_rows * k_rows * heads * batch), a work measure
    compute_s: float = 0.0
    wait_s: float = 0.0
    bytes_sent: int = 0
    events: Callable = field(default=cuda_events, repr=False, compare=False)
    _pending: list = field(default_factory=list, repr=False, compare=False)
    # forward kernel calls per (backend, block kind: full/causal/window/varlen/mask)
    blocks: dict = field(default_factory=dict)

    def count_block(self, backend: str, kind: str) -> None:
        self.blocks[backend, kind] = self.blocks.get((backend, kind), 0) + 1

    def __enter__(self):
        _ACTIVE.append(self)
        return self

    def __exit__(self, *exc):
        _ACTIVE.remove(self)
        self.resolve()

    def resolve(self) -> None:
        """Add the device regions' times (waits for their events: one sync, at the end)."""
        for kind, start, end in self._pending:
            end.synchronize()
            setattr(self, kind, getattr(self, kind) + start.elapsed_time(end) / 1e3)
        self._pending.clear()


def active() -> RingProfile | None:
    return _ACTIVE[-1] if _ACTIVE else None


@contextmanager
def timed(kind: str, device=None):
    """Adds the region's time on ``device`` to the active profile's ``compute_s`` or
    ``wait_s`` (see the module doc)."""
    prof = active()
    if prof is None:
        yield
        return
    start = prof.events(device)
    if start is None:
        t0 = time.perf_counter()
        yield
        setattr(prof, kind, getattr(prof, kind) + time.perf_counter() - t0)
        return
    start.record()
    yield
    end = prof.events(device)
    end.record()
    prof._pending.append((kind, start, end))
