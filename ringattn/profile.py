"""Opt-in instrumentation of the ring loop: kernel calls, ring steps, communication waits.

    with ringattn.profile.RingProfile() as prof:
        out = ringattn.ring_attention(q, k, v, causal=True)
    prof.kernel_calls, prof.ring_steps, prof.wait_s, prof.compute_s, prof.scores

Off by default (nothing is recorded and no device is synchronised). When on, CUDA is
synchronised around each timed region so that host clocks measure device work: this
costs overlap, so benchmarks report the untimed run separately.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass

_ACTIVE: list["RingProfile"] = []


@dataclass
class RingProfile:
    kernel_calls: int = 0
    ring_steps: int = 0
    scores: int = 0  # query-key pairs computed (q_rows * k_rows * heads * batch), a work measure
    compute_s: float = 0.0
    wait_s: float = 0.0
    bytes_sent: int = 0

    def __enter__(self):
        _ACTIVE.append(self)
        return self

    def __exit__(self, *exc):
        _ACTIVE.remove(self)


def active() -> RingProfile | None:
    return _ACTIVE[-1] if _ACTIVE else None


def _sync(device):
    import torch

    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


@contextmanager
def timed(kind: str, device=None):
    """Adds the region's wall time to the active profile's ``compute_s`` or ``wait_s``."""
    prof = active()
    if prof is None:
        yield
        return
    _sync(device)
    start = time.perf_counter()
    yield
    _sync(device)
    setattr(prof, kind, getattr(prof, kind) + time.perf_counter() - start)
