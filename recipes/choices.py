"""Typed choices for the recipes' configs.

A config field typed with a ``Choice`` is checked by OmegaConf when Hydra composes the config:
an unknown value fails before any work, with an error naming the field and the allowed values
("Invalid value 'fp16', expected one of [fp32, bf16] ... full_key: trainer.dtype"). Members are
strs: they compare equal to, print as and serialise as their value.
"""
from __future__ import annotations

import enum

import torch

from ringattn.kernels import BACKENDS
from ringattn.layouts import LAYOUTS
from ringattn.plan import STRATEGIES

_TORCH = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class Choice(str, enum.Enum):
    def __str__(self) -> str:
        return self.value


class Dtype(Choice):
    """Parameter and compute dtype of a recipe."""

    fp32 = "fp32"
    bf16 = "bf16"

    @property
    def torch(self) -> torch.dtype:
        return _TORCH[self.value]


class AttnDtype(Choice):
    """Input dtype of an attention benchmark."""

    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"

    @property
    def torch(self) -> torch.dtype:
        return _TORCH[self.value]


Layout = Choice("Layout", {name: name for name in LAYOUTS})  # the library's layout registry
Strategy = Choice("Strategy", {name: name for name in STRATEGIES})  # the library's strategies
# auto or one of the library's kernel backends (ringattn.kernels.BACKENDS)
KernelName = Choice("KernelName", {"auto": "auto", **{name: name for name in BACKENDS}})


def at_least(name: str, value, minimum=1, allow_none: bool = False) -> None:
    """Range check for ``__post_init__``: ``value >= minimum`` (or None if allowed), else a
    ValueError naming the field."""
    if value is None and allow_none:
        return
    if value is None or value < minimum:
        raise ValueError(f"{name}={value}: must be >= {minimum}")
