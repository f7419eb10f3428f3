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
models, the loss, generation -- must stay on the device. A tensor made from Python data
(``torch.tensor([...], device=...)``: built on the host, then copied) shows no op to the
dispatcher, so the mode also watches Python calls (``_HostCalls``, a TorchFunctionMode).

Where meta cannot serve -- code that needs values, such as flash-attn's Python package on its
CPU stand-in (tests/device_strict_flash.py) or a stand-in for CUDA's efficient attention --
the host plays the device: ``DeviceStrict("cpu", kernels=[...])`` over real CPU tensors
refuses what would make a tensor off a GPU (a factory without a device, Python data,
``.cpu()`` / ``.tolist()`` / ``.numpy()`` / ``.to("cpu")``) and every host sync, the
data-dependent sizes included (``nonzero``, boolean-mask indexing, ``unique``, ...); code in
the ``kernels`` files plays a device kernel and may read its arguments. What it cannot see: a
copy to the host written as ``.to(some_cpu_device_object)`` (on meta it fails as any copy).
"""
from __future__ import annotations

import contextlib
import os
import sys

import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode
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
    # the step's range masks of the transformers adapter (Llama 4's chunks), built on the host
    # from the step's cu_seqlens once per forward, with the plan
    os.path.join("ringattn", "models", "hf.py"): frozenset({"_layer_masks"}),
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


_aten = torch.ops.aten
# Ops the host must wait for: a value read on the host, or an output whose size depends on
# the data (CUDA syncs to size it). -> what the message calls them.
HOST_SYNCS = {
    _aten._local_scalar_dense: ".item()/.tolist()/bool/int/float of a tensor",
    _aten.nonzero: "nonzero (its size depends on the data)",
    _aten.masked_select: "masked_select (its size depends on the data)",
    _aten._unique2: "unique (its size depends on the data)",
    _aten.unique_dim: "unique (its size depends on the data)",
    _aten.unique_consecutive: "unique_consecutive (its size depends on the data)",
    _aten.bincount: "bincount (its size depends on the data)",
    _aten.equal: "torch.equal (a bool on the host)",
}
# indexing with a boolean mask runs nonzero inside the op (not seen as an op of its own)
_MASK_INDEXING = (_aten.index, _aten.index_put, _aten.index_put_, _aten._index_put_impl_)
# factories that make their tensor on the host unless given a device
_FACTORIES = frozenset({torch.arange, torch.zeros, torch.ones, torch.empty, torch.full,
                        torch.rand, torch.randn, torch.randint, torch.randperm, torch.linspace,
                        torch.logspace, torch.eye, torch.tril_indices, torch.triu_indices,
                        torch.empty_strided, torch.scalar_tensor})
_FROM_DATA = frozenset({torch.tensor, torch.as_tensor, torch.asarray})
_TO_HOST = {torch.Tensor.cpu: ".cpu()", torch.Tensor.numpy: ".numpy()",
            torch.Tensor.tolist: ".tolist()"}

_HOST_CODE: dict = {}  # code object -> is it allowed host work (memo: the stack is walked often)


def _is_host_work(code, kernels=()) -> bool:
    key = (code, kernels)
    if key not in _HOST_CODE:
        _HOST_CODE[key] = any(code.co_filename.endswith(file) for file in kernels) or any(
            code.co_name in names and code.co_filename.endswith(file)
            for file, names in HOST_WORK.items())
    return _HOST_CODE[key]


def _in_plan(kernels=()) -> bool:
    frame = sys._getframe(2)
    while frame is not None:
        if _is_host_work(frame.f_code, kernels):
            return True
        frame = frame.f_back
    return False


def _where() -> str:
    """The innermost frames of ringattn / transformers code that made the op."""
    frames, frame = [], sys._getframe(2)
    while frame is not None and len(frames) < 4:
        name = frame.f_code.co_filename
        if ("ringattn" in name or "transformers" in name or "flash_attn" in name) \
                and "device_strict" not in name:
            frames.append(f"{os.path.basename(name)}:{frame.f_lineno} ({frame.f_code.co_name})")
        frame = frame.f_back
    return " <- ".join(frames) or "?"


def _sync_in(func, args, kwargs) -> str | None:
    """Why ``func(*args, **kwargs)`` makes the host wait for the device, else None."""
    packet = func.overloadpacket
    if packet in HOST_SYNCS:
        return HOST_SYNCS[packet]
    if packet is _aten.repeat_interleave and func is _aten.repeat_interleave.Tensor \
            and kwargs.get("output_size") is None:
        return "repeat_interleave of tensor repeats without output_size (its size depends on the data)"
    if packet in _MASK_INDEXING:
        indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
        if any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8)
               for i in indices or ()):
            return "indexing with a boolean mask (a nonzero inside: its size depends on the data)"
    return None


class _HostCalls(TorchFunctionMode):
    """The half of ``DeviceStrict`` that sees Python calls, before they become ops: a tensor
    made from Python data (``torch.tensor([...])``: built on the host, then copied, whatever
    its ``device=``; the dispatcher sees no op for it), and -- where the host plays the device
    -- a factory given no device and an explicit copy to the host."""

    def __init__(self, strict: "DeviceStrict"):
        super().__init__()
        self.strict = strict

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        why = None
        data = args[1:2] if func is torch.Tensor.new_tensor else args[:1]
        if (func in _FROM_DATA or func is torch.Tensor.new_tensor) and data \
                and not isinstance(data[0], torch.Tensor):
            why = f"{func.__name__} of Python data: built on the host and copied to the device"
        elif self.strict.device.type == "cpu":  # the host plays the device: what would be off it
            if func in _FACTORIES and kwargs.get("device") is None:
                why = f"torch.{func.__name__} without a device: made on the host, not the data's device"
            elif func in _TO_HOST:
                why = f"host sync: {_TO_HOST[func]} copies a device tensor to the host"
            elif func is torch.Tensor.to and "cpu" in (*args[1:2], kwargs.get("device")):
                why = "host sync: .to('cpu') copies a device tensor to the host"
        if why is not None and not _in_plan(self.strict.kernels):
            raise DeviceStrictError(f"{why}, on the hot path at {_where()}")
        return func(*args, **kwargs)


class DeviceStrict(TorchDispatchMode):
    """Fails loudly on any op that makes a tensor off ``device`` or reads a tensor on the
    host, outside the plan's host work (see the module doc). ``ops`` counts the ops seen.

    ``device="cpu"``: the host plays the device, over real data (for code that needs values:
    flash-attn's Python package on its CPU stand-in). Device checks cannot see a CPU tensor
    there, so the calls that would make one on a GPU are refused instead: a factory without
    a device, ``torch.tensor`` of Python data, ``.cpu()`` / ``.tolist()`` / ``.numpy()`` /
    ``.to("cpu")``; host syncs are the same ops as on meta, plus the data-dependent sizes
    (``nonzero``, boolean-mask indexing, ``unique``, ...). ``kernels``: files whose code plays
    a device kernel (a stand-in for compiled CUDA code reads its arguments as the GPU would);
    anything they call is allowed."""

    def __init__(self, device, kernels=()):
        super().__init__()
        self.device = torch.device(device)
        self.kernels = tuple(kernels)
        self.ops = 0
        self._calls = _HostCalls(self)

    def __enter__(self):
        self._calls.__enter__()
        try:
            return super().__enter__()
        except BaseException:
            self._calls.__exit__(None, None, None)
            raise

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            self._calls.__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.ops += 1
        sync = _sync_in(func, args, kwargs)
        if sync is not None and not _in_plan(self.kernels):
            raise DeviceStrictError(f"host sync: {func} ({sync}) on the hot path at {_where()}")
        for t in tree_leaves((args, kwargs)):  # a host tensor read on the device: a copy per call
            if isinstance(t, torch.Tensor) and t.device != self.device and not _in_plan(self.kernels):
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
            if isinstance(t, torch.Tensor) and t.device != self.device and not _in_plan(self.kernels):
                raise DeviceStrictError(
                    f"{func} made a {tuple(t.shape)} tensor on {t.device}, not on the data's "
                    f"device {self.device}, at {_where()}")
        return out
