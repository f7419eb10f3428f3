"""Attention kernel backends: one (Q block, KV block) -> (out, lse), and its backward.

``get_backend(name, q, mask=..., softcap=...)`` resolves ``"auto"`` to the first backend of
q's device's row in ``choice.AUTO_TABLE`` (by compute capability; CPU: flash_attn > sdpa >
math) that supports q's device, dtype and head_dim *and* the requested features (``math``
supports everything); an explicitly named backend that cannot run the input or lacks a
feature raises a ValueError naming what is missing.
"""
from __future__ import annotations

import torch

from . import choice
from .base import KernelBackend
from .fa3 import Fa3Backend
from .flash import FlashAttnBackend
from .math import MathBackend
from .sdpa import SdpaBackend
from .torch_varlen import TorchVarlenBackend

BACKENDS: dict[str, KernelBackend] = {
    b.name: b for b in (Fa3Backend(), FlashAttnBackend(), TorchVarlenBackend(), SdpaBackend(),
                         MathBackend())
}


def missing_feature(backend: KernelBackend, q: torch.Tensor, *, mask: bool = False,
                    softcap: float | None = None, window: bool = False,
                    varlen: bool = False) -> str | None:
    """None if ``backend`` can run q with these features, else what it lacks."""
    why_not = backend.supports(q)
    if why_not is not None:
        return why_not
    if mask and not backend.supports_mask:
        return "it takes no dense attention mask (irregular document / window blocks)"
    if window and not backend.supports_window:
        return "it takes no window band"
    if varlen and not backend.supports_varlen:
        return "it takes no packed sequences (varlen)"
    if softcap is not None and not backend.supports_softcap:
        return f"it has no logit softcapping (softcap={softcap})"
    return None


def get_backend(name: str, q: torch.Tensor, *, mask: bool = False,
                softcap: float | None = None, window: bool = False,
                varlen: bool = False) -> KernelBackend:
    features = dict(mask=mask, softcap=softcap, window=window, varlen=varlen)
    if name == "auto":
        active = choice.torch_impl_active()
        picked = choice.choose(choice.capability_of(q.device),
                               lambda c: c.backend in BACKENDS and
                               missing_feature(BACKENDS[c.backend], q, **features) is None,
                               () if active is None else (active,))
        return BACKENDS[picked.backend]
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {['auto', *BACKENDS]}")
    why_not = missing_feature(BACKENDS[name], q, **features)
    if why_not is not None:
        raise ValueError(f"backend {name!r} cannot run this input: {why_not}")
    return BACKENDS[name]


__all__ = ["BACKENDS", "KernelBackend", "get_backend", "missing_feature"]
