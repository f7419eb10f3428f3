"""Which attention kernel ``backend="auto"`` runs on which GPU: one table, overridable.

``AUTO_TABLE`` lists, per GPU generation (lowest compute capability first matched from the
top), the candidates in order of preference; ``choose`` takes the first one that is installed
and can run the device, dtype and head dims. A candidate is a ringattn backend, optionally with
a torch flash implementation (``"FA3"`` / ``"FA4"``) that torch routes its own flash op to
(``torch.nn.attention.activate_flash_attention_impl``, prototype in torch 2.13): then
``torch_varlen`` runs FA3/FA4. torch asks providers not to activate on import, so those rows
count only once activated: the caller opts in (``choose_at_start(torch_impls=True)``; the
recipes' ``parallel.torch_flash_impl=true``) and ``activate`` routes torch once at start-up;
after that ``get_backend("auto")`` picks them too. The order is not measured yet: no row has run on a
GPU (scripts/device_check.sh times each backend the GPU supports, to fill it in).

Not in the table: cuDNN attention. torch 2.13's ``varlen_attn`` never routes to it
(``_should_use_cudnn`` returns False) and its cuDNN ops take no window; ``sdpa`` on CUDA runs
the memory-efficient kernel.
"""
from __future__ import annotations

import functools
import importlib.util
import logging
from dataclasses import dataclass

import torch

log = logging.getLogger("ringattn")


@dataclass(frozen=True)
class Candidate:
    backend: str  # a ringattn.kernels.BACKENDS name
    torch_impl: str | None = None  # "FA3" | "FA4": torch's flash op routed there (torch_varlen)
    label: str = ""  # what the start-up line names: "FA4 via torch"

    def __str__(self) -> str:
        return self.label or self.backend


FLASH_ATTN_2 = Candidate("flash_attn", label="flash-attn 2")
TORCH_FLASH = Candidate("torch_varlen", label="torch flash (FA2)")
SDPA = Candidate("sdpa", label="sdpa")
MATH = Candidate("math", label="math")

# (minimum compute capability as major * 10 + minor, candidates in order). CPU: CPU_ORDER.
AUTO_TABLE: tuple[tuple[int, tuple[Candidate, ...]], ...] = (
    (100, (Candidate("torch_varlen", "FA4", "FA4 via torch"), FLASH_ATTN_2, TORCH_FLASH, SDPA, MATH)),
    (90, (Candidate("fa3", label="FA3"), Candidate("torch_varlen", "FA3", "FA3 via torch"),
          FLASH_ATTN_2, TORCH_FLASH, SDPA, MATH)),
    (80, (FLASH_ATTN_2, TORCH_FLASH, SDPA, MATH)),
    (0, (SDPA, MATH)),
)
CPU_ORDER: tuple[Candidate, ...] = (FLASH_ATTN_2, SDPA, MATH)  # flash_attn only on a CPU stand-in

# torch's registered implementation -> the module its registration imports
# (torch/nn/attention/_fa3.py register_flash_attention_fa3, _fa4.py register_flash_attention_fa4)
TORCH_IMPL_MODULES = {"FA3": "flash_attn_interface", "FA4": "flash_attn.cute.interface"}


def row(capability: int | None) -> tuple[Candidate, ...]:
    """The table's candidates for a GPU of ``capability`` (e.g. 90), or for the CPU (None)."""
    if capability is None:
        return CPU_ORDER
    return next(order for least, order in AUTO_TABLE if capability >= least)


def torch_impl_available(impl: str) -> bool:
    """Whether torch knows ``impl`` and the module its registration imports is installed."""
    try:
        from torch.nn.attention import list_flash_attention_impls
    except ImportError:  # pragma: no cover - torch < 2.10
        return False
    module = TORCH_IMPL_MODULES.get(impl)
    if impl not in list_flash_attention_impls() or module is None:
        return False
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # its parent package is missing
        return False
    except ValueError:  # loaded without a spec: not an installed package (e.g. a test stand-in)
        return False


def torch_impl_active() -> str | None:
    """The implementation torch's flash op is routed to now ("FA3", "FA4"), or None."""
    try:
        from torch.nn.attention import current_flash_attention_impl
    except ImportError:  # pragma: no cover - torch < 2.10
        return None
    return current_flash_attention_impl()


def choose(capability: int | None, runs, torch_impls=()) -> Candidate:
    """The first candidate of ``capability``'s row that ``runs(candidate)`` (installed, able to
    run the input); a candidate with a torch impl only if that impl is in ``torch_impls``."""
    for candidate in row(capability):
        if candidate.torch_impl is not None and candidate.torch_impl not in torch_impls:
            continue
        if runs(candidate):
            return candidate
    return MATH


@functools.lru_cache(maxsize=None)
def _cuda_capability(index: int) -> int:
    major, minor = torch.cuda.get_device_capability(index)
    return major * 10 + minor


def capability_of(device: torch.device) -> int | None:
    """major * 10 + minor of a CUDA device (cached: read once per device); None otherwise."""
    if device.type != "cuda":
        return None
    return _cuda_capability(device.index if device.index is not None else torch.cuda.current_device())


def choose_at_start(device: torch.device, dtype: torch.dtype, head_dim: int, *,
                    torch_impls: bool = False) -> Candidate:
    """What ``auto`` will run for inputs of this device/dtype/head_dim, before any work; with
    ``torch_impls`` (opt-in), rows that activate FA3/FA4 in torch count where installed."""
    from . import BACKENDS

    probe = torch.empty(1, 1, 1, head_dim, device=device, dtype=dtype)
    usable = tuple(i for i in TORCH_IMPL_MODULES if torch_impls and torch_impl_available(i))
    return choose(capability_of(device),
                  lambda c: c.backend in BACKENDS and BACKENDS[c.backend].supports(probe) is None,
                  usable)


_logged: set = set()


def activate(candidate: Candidate, device: torch.device, *, log_line: bool = True) -> str:
    """Route torch's flash op to the candidate's implementation (if any), once, and log the
    choice once per process (``log_line``: on the logging rank): "attention kernel: FA3 (sm90)".
    -> the line."""
    if candidate.torch_impl is not None and torch_impl_active() != candidate.torch_impl:
        from torch.nn.attention import activate_flash_attention_impl

        activate_flash_attention_impl(candidate.torch_impl)
    cap = capability_of(device)
    line = f"attention kernel: {candidate} ({'cpu' if cap is None else f'sm{cap}'})"
    if log_line and line not in _logged:
        _logged.add(line)
        log.info(line)
    return line


# backend names per block kind that ran a forward, e.g. {"causal": {"torch_varlen"}}: a set
# insert per kernel call on the host (no sync, no collective); the recipes write it once
_RAN: dict[str, set] = {}


def note(backend: str, kind: str) -> None:
    """Record that ``backend`` ran a forward of a ``kind`` block."""
    _RAN.setdefault(kind, set()).add(backend)


def ran() -> dict[str, list[str]]:
    """{block kind: [backends that ran it]} so far in this process."""
    return {kind: sorted(names) for kind, names in sorted(_RAN.items())}
