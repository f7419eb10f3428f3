"""Peak tensor memory of a code region, on CUDA and on CPU.

CUDA: the caching allocator's ``max_memory_allocated``. CPU has no allocator statistics,
so a ``TorchDispatchMode`` watches every op's outputs: each new storage adds its bytes,
and a finalizer on the tensor that owns it subtracts them when it dies. Views and
in-place results share a storage already counted, so they add nothing.
"""
from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class _LiveBytes(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._seen: set[int] = set()

    def _release(self, ptr, nbytes):
        self._seen.discard(ptr)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                storage = t.untyped_storage()
                ptr, nbytes = storage.data_ptr(), storage.nbytes()
                if nbytes and ptr not in self._seen:
                    self._seen.add(ptr)
                    self.live += nbytes
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(t, self._release, ptr, nbytes)
        return out


class PeakMemory:
    """``with PeakMemory(device) as m: ...`` then ``m.peak_bytes``: peak bytes allocated
    inside the region beyond what was live at its start."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.peak_bytes = 0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
        else:
            self._mode = _LiveBytes()
            self._mode.__enter__()
        return self

    @property
    def live_bytes(self) -> int:
        """Bytes allocated inside the region and still live (while the region is open)."""
        if self.device.type == "cuda":
            return torch.cuda.memory_allocated(self.device) - self._start
        return self._mode.live

    @property
    def peak_so_far(self) -> int:
        """The peak since entering or since the last ``reset_peak`` (while the region is open)."""
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) - self._start
        return self._mode.peak

    def reset_peak(self) -> None:
        """Restart the peak from what is live now (e.g. to measure one step of many)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self._mode.peak = self._mode.live

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self._start
        else:
            self._mode.__exit__(*exc)
            self.peak_bytes = self._mode.peak
