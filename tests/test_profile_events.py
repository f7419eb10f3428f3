"""``profile.timed`` on a device: events on the compute stream, read once at the end, so the
ring's transfer waits land in ``wait_s`` (on CUDA they are ``torch.cuda.Event``s; the CUDA
factory itself runs in tests/test_gpu.py). Here an injected event factory with a scripted
clock proves the logic on CPU: which regions are timed, with what, and that nothing waits
for the device before the profile ends."""
from __future__ import annotations

import torch

import ringattn
from ringattn import profile
from tests.device_strict import fake_world


class ScriptedEvent:
    """``torch.cuda.Event``'s interface on a scripted clock (seconds)."""

    clock = 0.0
    synced: list = []

    def record(self):
        ScriptedEvent.clock += 1.0
        self.t = ScriptedEvent.clock

    def synchronize(self):
        ScriptedEvent.synced.append(self)

    def elapsed_time(self, end):
        return (end.t - self.t) * 1e3  # ms, as CUDA events report


def test_device_regions_are_timed_with_events_read_at_exit():
    devices = []

    def events(device):
        devices.append(device)
        return ScriptedEvent() if device.type == "meta" else None

    ScriptedEvent.synced = []
    with profile.RingProfile(events=events) as prof:
        with profile.timed("compute_s", torch.device("meta")):
            pass  # events: start at t=1, end at t=2
        with profile.timed("wait_s", torch.device("meta")):
            pass  # t=3 .. t=4
        with profile.timed("wait_s", torch.device("cpu")):
            pass  # the host clock (no event for the host)
        assert prof.compute_s == 0.0 and not ScriptedEvent.synced, "nothing is read before exit"
    assert prof.compute_s == 1.0 and 1.0 <= prof.wait_s < 1.5
    assert len(ScriptedEvent.synced) == 2  # each device region's end event, once, at exit
    assert profile.cuda_events(torch.device("cpu")) is None


def test_ring_step_waits_and_computes_are_device_regions():
    """Ring attention at P = 4 (one rank played on meta): each of the 4 steps' kernels is a
    compute region and each of the 3 transfers the compute stream waits for is a wait
    region, all timed with device events."""
    regions = []

    def events(device):
        regions.append(device)
        return ScriptedEvent()

    with fake_world(2, 4):
        sp = ringattn.SequenceParallel("ring", "contiguous")
        q, k, v = (torch.empty(1, 8, 2, 8, device="meta") for _ in range(3))
        with profile.RingProfile(events=events) as prof:
            sp.attention(q, k, v, causal=False)
    assert prof.ring_steps == 4 and all(d.type == "meta" for d in regions)
    # scripted events: every region lasts exactly one tick (1 s)
    assert prof.compute_s == 4.0 and prof.wait_s == 3.0
