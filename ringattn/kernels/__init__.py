"""Attention kernel backends: one (Q block, KV block) -> (out, lse), and its backward.

``get_backend(name, q)`` resolves ``"auto"`` to the fastest backend that supports q's
device, dtype and head_dim (flash_attn > sdpa > math); an explicitly named backend that
cannot run raises a ValueError saying what is missing.
"""
from __future__ import annotations

import torch

from .base import KernelBackend
from .flash import FlashAttnBackend
from .math import MathBackend
from .sdpa import SdpaBackend

BACKENDS: dict[str, KernelBackend] = {
    b.name: b for b in (FlashAttnBackend(), SdpaBackend(), MathBackend())
}
_AUTO_ORDER = ("flash_attn", "sdpa", "math")


def get_backend(name: str, q: torch.Tensor) -> KernelBackend:
    if name == "auto":
        for candidate in _AUTO_ORDER:
            if BACKENDS[candidate].supports(q) is None:
                return BACKENDS[candidate]
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {['auto', *BACKENDS]}")
    why_not = BACKENDS[name].supports(q)
    if why_not is not None:
        raise ValueError(f"backend {name!r} cannot run this input: {why_not}")
    return BACKENDS[name]


__all__ = ["BACKENDS", "KernelBackend", "get_backend"]
