"""A device-strict run: one process plays rank r of P with every tensor on the meta device.

Why the meta device and a fake process group (rather than, say, CPU tensors under a
dispatch mode alone): a meta tensor has a device but no data, so
- reading it on the host (``.item()``, ``.tolist()``, ``bool(t)``, ``int(t)``) raises, as
  does mixing it with a non-scalar CPU tensor: a host sync or a tensor made on the CPU
  cannot go unnoticed, exactly as it would cost a sync or fail on a GPU;
- it costs no compute, so one process can play every rank of P = 2 and 4 for a whole
  matrix of strategies x layouts x masks, for a training step and for generation, in
  seconds.
The process group is torch's fake backend (its collectives complete at once; an
all-gather hands every rank the caller's tensor, so ranks "agree"), registered under its
own name with the meta device added (torch's "fake" covers cpu/cuda only) through the
public ``torch.distributed.Backend.register_backend``.

What meta alone would let through -- a CPU tensor made on the hot path and copied to the
device (a host-to-device copy every call), or a CPU scalar tensor mixed in -- is caught by
``DeviceStrict``, a TorchDispatchMode: every op must produce tensors on the data's device
only, and ``aten._local_scalar_dense`` (the host sync behind ``.item()``) is refused. The
one allowed host work is the step's plan (``AttentionPlan.prepare`` and the plan's lazily
built, cached masks and tasks: once per step by design), recognised by its frames on the
stack (and the layouts' index arithmetic that shards a step's data); everything else -- every attention call, forward, recompute and backward, the
models, the loss, generation -- must stay on the device.
"""
from __future__ import annotations

import contextlib
import os
import sys

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

BACKEND = "ringattn_meta_fake"

# The allowed host work, once per step: the plan (its cross-rank check, and its masks and
# tasks, built before the step or lazily on first use, and cached), and the layouts' index arithmetic that
# shards a step's data (``shard`` / ``positions``). (file, function) frames on the stack.
HOST_WORK = {
    os.path.join("ringattn", "plan.py"): frozenset({
        "prepare", "build", "agree", "__init__", "mask", "ring_steps", "local_tasks",
        "allgather_tasks", "allgather_order", "gathered_order", "kv_index", "_on_device"}),
    os.path.join("ringattn", "sharding.py"): frozenset({"positions", "held_indices"}),
    os.path.join("ringattn", "parallel.py"): frozenset({"positions"}),
    # a prompt's document boundaries for generation's prefill: host metadata, like cu_seqlens
    os.path.join("ringattn", "models", "generation.py"): frozenset({"_one_document"}),
}


class DeviceStrictError(AssertionError):
    """A tensor made on the wrong device, or a host sync, outside the step's plan."""


def _register_backend() -> None:
    if hasattr(dist.Backend, BACKEND.upper()):
        return
    # torch's own fake process group (testing helper), for the meta device as well
    from torch.testing._internal.distributed.fake_pg import _create_fake_pg

    dist.Backend.register_backend(BACKEND, _create_fake_pg, extended_api=True,
                                  devices=["cpu", "meta"])


@contextlib.contextmanager
def fake_world(rank: int, world_size: int):
    """The default process group as rank ``rank`` of ``world_size``, no other process."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    _register_backend()
    dist.init_process_group(BACKEND, store=FakeStore(), rank=rank, world_size=world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()


_HOST_CODE: dict = {}  # code object -> is it allowed host work (memo: the stack is walked often)


def _is_host_work(code) -> bool:
    if code not in _HOST_CODE:
        _HOST_CODE[code] = any(code.co_name in names and code.co_filename.endswith(file)
                               for file, names in HOST_WORK.items())
    return _HOST_CODE[code]


def _in_plan() -> bool:
    frame = sys._getframe(2)
    while frame is not None:
        if _is_host_work(frame.f_code):
            return True
        frame = frame.f_back
    return False


def _where() -> str:
    """The innermost frames of ringattn / transformers code that made the op."""
    frames, frame = [], sys._getframe(2)
    while frame is not None and len(frames) < 4:
        name = frame.f_code.co_filename
        if ("ringattn" in name or "transformers" in name) and "device_strict" not in name:
            frames.append(f"{os.path.basename(name)}:{frame.f_lineno} ({frame.f_code.co_name})")
        frame = frame.f_back
    return " <- ".join(frames) or "?"


class DeviceStrict(TorchDispatchMode):
    """Fails loudly on any op that makes a tensor off ``device`` or reads a tensor on the
    host, outside the plan's host work (see the module doc). ``ops`` counts the ops seen."""

    def __init__(self, device):
        super().__init__()
        self.device = torch.device(device)
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.ops += 1
        if func is torch.ops.aten._local_scalar_dense.default and not _in_plan():
            raise DeviceStrictError(f"host sync: {func} (.item()/.tolist()/bool/int of a tensor) "
                                    f"on the hot path at {_where()}")
        for t in tree_leaves((args, kwargs)):  # a host tensor read on the device: a copy per call
            if isinstance(t, torch.Tensor) and t.device != self.device and not _in_plan():
                raise DeviceStrictError(
                    f"{func} reads a {tuple(t.shape)} tensor on {t.device}, not on the data's "
                    f"device {self.device} (a host-to-device copy on the hot path), at {_where()}")
        try:
            out = func(*args, **kwargs)
        except NotImplementedError as e:  # e.g. .tolist()/.cpu() of a meta tensor
            if "out of meta tensor" not in str(e):
                raise
            raise DeviceStrictError(f"host sync: {func} copies a device tensor to the host "
                                    f"at {_where()}") from e
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device != self.device and not _in_plan():
                raise DeviceStrictError(
                    f"{func} made a {tuple(t.shape)} tensor on {t.device}, not on the data's "
                    f"device {self.device}, at {_where()}")
        return out
