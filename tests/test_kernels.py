"""Each kernel backend against the plain-PyTorch ``math`` backend and the float64 reference.

Backward is driven the way the ring drives it: with the final out and lse of the row.
Tolerances: fp32/fp64 1e-5 of the reference's max-abs (see test_ring_attention); 16-bit
fused kernels against the fp64 reference within 2x the error of math in the same dtype
plus one bf16 ulp at the output scale (the fused kernels round block outputs once).
"""
from __future__ import annotations

import itertools

import pytest
import torch

from ringattn.kernels import BACKENDS, get_backend
from tests.reference import reference_attention, rel_err

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")


def _case(device, dtype, b=2, sq=33, sk=33, h=8, hk=2, d=64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    mk = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64)  # noqa: E731
    q, k, v, do = mk(b, sq, h, d), mk(b, sk, hk, d), mk(b, sk, hk, d), mk(b, sq, h, d)
    return (q, k, v, do), tuple(t.to(device, dtype) for t in (q, k, v, do))


def _run(backend, q, k, v, do, causal, scale):
    out, lse = backend.forward(q, k, v, causal=causal, scale=scale)
    dq, dk, dv = backend.backward(do, q, k, v, out.to(q.dtype), lse, causal=causal, scale=scale)
    return out, lse, dq, dk, dv


def _check_against_reference(name, device, dtype, tol_factor=None):
    backend = BACKENDS[name]
    math = BACKENDS["math"]
    shapes = [dict(sq=33, sk=33), dict(sq=16, sk=40), dict(sq=64, sk=64, hk=8, d=80), dict(hk=1, d=128)]
    for shape, causal in itertools.product(shapes, (False, True)):
        if causal and shape.get("sq", 33) != shape.get("sk", 33):
            continue  # layouts only ask for causal on square blocks
        full, (q, k, v, do) = _case(device, dtype, **shape)
        scale = q.shape[-1] ** -0.5
        ref = reference_attention(*full, causal=causal, scale=scale)
        ref = (ref[0], ref[1], *ref[2:])
        got = _run(backend, q, k, v, do, causal, scale)
        assert got[1].dtype in (torch.float32, torch.float64)
        errs = [rel_err(g.cpu(), r) for g, r in zip(got, ref)]
        if tol_factor is None:
            assert max(errs) <= 1e-5, (name, shape, causal, errs)
        else:
            base = [rel_err(g.cpu(), r) for g, r in zip(_run(math, q, k, v, do, causal, scale), ref)]
            for e, m, what in zip(errs, base, ("out", "lse", "dq", "dk", "dv")):
                assert e <= tol_factor * m + 2 ** -8, (name, shape, causal, what, e, m)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", ["math", "sdpa"])
def test_cpu_backends_match_reference(name, dtype):
    _check_against_reference(name, "cpu", dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cpu_sdpa_low_precision_close_to_math(dtype):
    _check_against_reference("sdpa", "cpu", dtype, tol_factor=2.0)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cuda_sdpa_backend(dtype):
    if dtype == torch.float32:
        _check_against_reference("sdpa", "cuda", dtype)
    else:
        _check_against_reference("sdpa", "cuda", dtype, tol_factor=2.0)


@needs_cuda
@pytest.mark.skipif(BACKENDS["flash_attn"].supports(torch.empty(1, 1, 1, 64, dtype=torch.bfloat16,
                    device="cuda" if CUDA else "cpu")) is not None, reason="flash-attn not installed")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_flash_attn_backend(dtype):
    _check_against_reference("flash_attn", "cuda", dtype, tol_factor=2.0)


def test_huge_logits_kernel_outputs_are_finite():
    q = torch.full((1, 8, 2, 16), 100.0)
    k = torch.full((1, 8, 2, 16), 100.0)
    v = torch.randn(1, 8, 2, 16)
    for name in ("math", "sdpa"):
        out, lse = BACKENDS[name].forward(q, k, v, causal=True, scale=1.0)
        assert torch.isfinite(out).all() and torch.isfinite(lse).all(), name
        # all scores equal 160000: row i averages v[0..i]
        want = v.cumsum(1) / torch.arange(1, 9).view(1, 8, 1, 1)
        assert torch.allclose(out, want, atol=1e-5), name


def test_auto_picks_a_fused_kernel_on_cpu_and_errors_name_what_is_missing():
    q = torch.empty(1, 4, 2, 64)
    assert get_backend("auto", q).name == "sdpa"
    with pytest.raises(ValueError, match="flash-attn runs on CUDA only"):
        get_backend("flash_attn", q)
    with pytest.raises(ValueError, match="unknown backend 'cudnn'"):
        get_backend("cudnn", q)
