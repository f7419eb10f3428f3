"""The ``auto`` kernel table (ringattn/kernels/choice.py): each row, with the compute capability
and what is installed patched, picks what the table in docs/kernels.md says."""
from __future__ import annotations

import logging

import pytest
import torch

from ringattn.kernels import choice, get_backend
from tests.torch_flash_standin import torch_flash_on_cpu

ALL = {"fa3", "flash_attn", "torch_varlen", "sdpa", "math"}

# (compute capability or None for CPU, backends installed, torch impls activated) -> (backend,
# torch impl): written from the docs' table, not read from the code's.
CASES = [
    (100, ALL, {"FA4"}, ("torch_varlen", "FA4")),
    (100, ALL, set(), ("flash_attn", None)),
    (120, ALL - {"flash_attn"}, set(), ("torch_varlen", None)),
    (90, ALL, {"FA3"}, ("fa3", None)),
    (90, ALL - {"fa3"}, {"FA3"}, ("torch_varlen", "FA3")),
    (90, ALL - {"fa3"}, set(), ("flash_attn", None)),
    (90, {"torch_varlen", "sdpa", "math"}, set(), ("torch_varlen", None)),
    (80, ALL, {"FA3", "FA4"}, ("flash_attn", None)),
    (86, ALL - {"flash_attn"}, set(), ("torch_varlen", None)),
    (89, {"sdpa", "math"}, set(), ("sdpa", None)),
    (75, ALL, set(), ("sdpa", None)),
    (None, ALL, set(), ("flash_attn", None)),
    (None, ALL - {"flash_attn"}, set(), ("sdpa", None)),
    (None, {"math"}, set(), ("math", None)),
]


@pytest.mark.parametrize("capability,installed,impls,expected", CASES)
def test_each_row_picks_what_the_table_says(capability, installed, impls, expected):
    picked = choice.choose(capability, lambda c: c.backend in installed, impls)
    assert (picked.backend, picked.torch_impl) == expected


def test_auto_follows_the_table_by_the_device_capability(monkeypatch):
    """get_backend("auto") reads the row of q's device: Hopper without FA3 or flash-attn runs
    torch's varlen kernel (here on its CPU stand-in), a feature it lacks falls through."""
    q = torch.randn(1, 8, 2, 16)
    assert get_backend("auto", q).name == "sdpa"  # CPU row; flash-attn not loaded here
    monkeypatch.setattr(choice, "capability_of", lambda device: 90)
    with torch_flash_on_cpu():
        assert get_backend("auto", q).name == "torch_varlen"
        assert get_backend("auto", q, softcap=5.0).name == "math"  # neither has softcap on CPU
        assert get_backend("auto", q, mask=True).name == "sdpa"
    monkeypatch.setattr(choice, "capability_of", lambda device: 75)
    with torch_flash_on_cpu():
        assert get_backend("auto", q).name == "sdpa"  # pre-Ampere row: no flash kernels


def test_activation_goes_through_torchs_registry_and_is_logged_once(caplog, monkeypatch):
    """A torch impl is activated with torch's own registry (opt-in, once); the choice is logged
    once per process as "attention kernel: <label> (sm<cc>)"."""
    from torch.nn.attention import restore_flash_attention_impl
    from torch.nn.attention._registry import register_flash_attention_impl

    calls = []
    register_flash_attention_impl("RINGATTN_TEST", register_fn=lambda: calls.append(1) or _Handle())
    monkeypatch.setattr(choice, "capability_of", lambda device: 90)
    monkeypatch.setattr(choice, "_logged", set())
    candidate = choice.Candidate("torch_varlen", "RINGATTN_TEST", "TEST via torch")
    try:
        with caplog.at_level(logging.INFO, logger="ringattn"):
            line = choice.activate(candidate, torch.device("cpu"))
            choice.activate(candidate, torch.device("cpu"))
        assert line == "attention kernel: TEST via torch (sm90)"
        assert calls == [1] and choice.torch_impl_active() == "RINGATTN_TEST"
        assert [r.getMessage() for r in caplog.records].count(line) == 1
    finally:
        restore_flash_attention_impl(_raise_warn=False)
    assert choice.torch_impl_active() is None


class _Handle:
    def remove(self):
        pass


def test_choose_at_start_needs_the_opt_in_for_torch_impls(monkeypatch):
    monkeypatch.setattr(choice, "capability_of", lambda device: 100)
    monkeypatch.setattr(choice, "torch_impl_available", lambda impl: True)
    with torch_flash_on_cpu():
        plain = choice.choose_at_start(torch.device("cpu"), torch.float32, 16)
        opted = choice.choose_at_start(torch.device("cpu"), torch.float32, 16, torch_impls=True)
    assert (plain.backend, plain.torch_impl) == ("torch_varlen", None)
    assert (opted.backend, opted.torch_impl) == ("torch_varlen", "FA4")
