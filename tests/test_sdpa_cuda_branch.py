"""The CUDA branch of the ``sdpa`` kernel (``ringattn.kernels.sdpa.EfficientAttention``: the
bias expanded per (batch, head) from one 16-aligned buffer, the log-sum-exp's 32-row padding
stripped in forward and re-added in backward, the zero philox seeds) without a GPU:

- over real CPU data, with a stand-in of torch's CUDA efficient-attention ops
  (tests/sdpa_efficient_standin.py: their contract, each convention naming its source), in
  float64 against the ``math`` kernel, for every block kind (full, top-left causal, band,
  dense mask with hidden rows, packed sequences) x tall / wide / one-row / unaligned shapes
  x GQA, under the device-strict checker with the host playing the device;
- on the meta device with torch's own ops (their meta kernels: the shapes they return), under
  the meta checker.
"""
from __future__ import annotations

import os

import pytest
import torch

from ringattn.kernels.math import MathBackend
from ringattn.kernels.sdpa import EfficientAttention, SdpaBackend
from tests import sdpa_efficient_standin as standin
from tests.device_strict import DeviceStrict

STANDIN = os.path.join("tests", "sdpa_efficient_standin.py")
# (q rows, k rows, q heads, kv heads[, v's head size]): unaligned to 32 and 16, tall, wide,
# one row, GQA; MLA's v narrower than q/k (16), which the efficient ops take as it is
SHAPES = [(37, 21, 4, 2), (5, 40, 2, 2), (33, 33, 4, 1), (1, 7, 2, 2), (64, 17, 2, 1),
          (37, 21, 4, 2, 8)]


def _blocks(sq, sk, gen):
    mask = torch.rand(sq, sk, generator=gen) < 0.6
    mask[0] = False  # a row the mask hides entirely
    cut_q, cut_k = sq // 2, sk // 3
    return {"full": dict(causal=False), "causal": dict(causal=True),
            "window": dict(causal=False, window=(3, 2)),
            "one_sided": dict(causal=False, window=(4, -1)),
            "mask": dict(causal=False, mask=mask),
            "segments": dict(causal=False, window=(-1, 0),
                             segments=((0, cut_q, cut_q, sq), (0, cut_k, sk, sk)))}


def _run(backend, q, k, v, dout, kw):
    out, lse = backend.forward(q, k, v, scale=0.3, **kw)
    grads = backend.backward(dout, q, k, v, out, lse, scale=0.3, **kw)
    return (out, lse, *grads)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_cuda_branch_on_a_standin_of_the_efficient_ops_is_exact_and_device_strict(shape):
    sq, sk, hq, hkv, dv = (*shape, 16)[:5]
    gen = torch.Generator().manual_seed(sum(shape))
    q = torch.randn(1, sq, hq, 16, generator=gen, dtype=torch.float64)
    dout = torch.randn(1, sq, hq, dv, generator=gen, dtype=torch.float64)
    k = torch.randn(1, sk, hkv, 16, generator=gen, dtype=torch.float64)
    v = torch.randn(1, sk, hkv, dv, generator=gen, dtype=torch.float64)
    cuda = SdpaBackend(EfficientAttention(standin.forward, standin.backward))
    for name, kw in _blocks(sq, sk, gen).items():
        want = _run(MathBackend(), q, k, v, dout, kw)
        with DeviceStrict("cpu", kernels=[STANDIN]):
            got = _run(cuda, q, k, v, dout, kw)
        for label, g, w in zip(("out", "lse", "dq", "dk", "dv"), got, want):
            assert g.shape == w.shape, (name, label, g.shape, w.shape)
            seen = torch.isfinite(w) if label == "lse" else torch.ones_like(w, dtype=torch.bool)
            if label == "out":  # rows no key reaches: the merge ignores them (lse -inf)
                seen = torch.isfinite(want[1]).transpose(1, 2)[..., None].expand_as(w)
            assert torch.allclose(g[seen], w[seen].to(g.dtype), rtol=1e-10, atol=1e-10), (name, label)
            if label == "lse":  # hidden rows: -inf as math writes (NaN: padding not stripped)
                assert (g[~seen] == float("-inf")).all(), name


def test_the_standin_refuses_what_the_cuda_ops_refuse():
    """Negative controls: the contract checks the branch is held to are live."""
    q = torch.randn(1, 2, 37, 8, dtype=torch.float64)
    unaligned = torch.zeros(37, 21, dtype=torch.float64)[None, None].expand(1, 2, 37, 21)
    k = torch.randn(1, 2, 21, 8, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="not correctly aligned"):
        standin.forward(q, k, k, unaligned, True)
    out, lse, seed, offset = standin.forward(q, k, k, None, True)
    assert lse.shape == (1, 2, 64) and lse[..., 37:].isnan().all()
    with pytest.raises(RuntimeError, match="padded to 32"):
        standin.backward(out, q, k, k, None, out, lse[..., :37].contiguous(), seed, offset, 0.0,
                         [True, True, True, False])


def test_cuda_branch_with_torchs_own_ops_on_meta_is_device_strict():
    """torch's efficient-attention ops on the meta device (their meta kernels): the branch
    hands them what they take and returns (out (b, s, h, d_v), lse (b, h, s) stripped), with no
    host work; on meta ``SdpaBackend()`` picks the efficient ops itself."""
    meta = torch.device("meta")
    sq, sk = 37, 21
    q, k = torch.empty(1, sq, 4, 16, device=meta), torch.empty(1, sk, 2, 16, device=meta)
    v, dout = torch.empty(1, sk, 2, 8, device=meta), torch.empty(1, sq, 4, 8, device=meta)  # MLA's v
    mask = torch.ones(sq, sk, dtype=torch.bool, device=meta)
    blocks = {"full": dict(causal=False), "causal": dict(causal=True),
              "window": dict(causal=False, window=(3, 2)), "mask": dict(causal=False, mask=mask),
              "segments": dict(causal=False, segments=((0, 20, sq), (0, 10, sk)))}
    for name, kw in blocks.items():
        with DeviceStrict(meta):
            out, lse, dq, dk, dv = _run(SdpaBackend(), q, k, v, dout, kw)
        assert out.shape == (1, sq, 4, 8) and lse.shape == (1, 4, sq), name
        assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape, name
