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


def _runs_on_cuda(name):
    """Whether backend ``name`` runs a bf16 head_dim-64 input on this machine's GPU."""
    return CUDA and BACKENDS[name].supports(torch.empty(1, 1, 1, 64, dtype=torch.bfloat16,
                                                        device="cuda")) is None


@needs_cuda
@pytest.mark.parametrize("name", ["torch_varlen", "fa3"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_torch_varlen_and_fa3_backends(name, dtype):
    """torch's varlen attention (sm80+) and FA3 (sm90, where installed) on the GPU against the
    float64 reference, as flash-attn 2 above; skipped with the reason where they cannot run."""
    if not _runs_on_cuda(name):
        pytest.skip(BACKENDS[name].supports(torch.empty(1, 1, 1, 64, dtype=dtype, device="cuda")))
    _check_against_reference(name, "cuda", dtype, tol_factor=2.0)


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


# ---- logit softcapping (Gemma 2) and attention sinks (GPT-OSS) --------------------------

def _softcap_case(name, device, dtype, causal, mask, softcap, **shape):
    full, (q, k, v, do) = _case(device, dtype, **shape)
    q, full = q * 4, (full[0] * 4, *full[1:])  # scores of O(10): the cap (c = 5) bites
    scale = q.shape[-1] ** -0.5
    ref = reference_attention(*full, causal=causal, scale=scale, mask=mask, softcap=softcap)
    b = BACKENDS[name]
    out, lse = b.forward(q, k, v, causal=causal, scale=scale, mask=mask, softcap=softcap)
    grads = b.backward(do, q, k, v, out.to(q.dtype), lse, causal=causal, scale=scale, mask=mask,
                       softcap=softcap)
    return [rel_err(g.cpu(), r) for g, r in zip((out, lse, *grads), ref)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_math_softcap_matches_reference(dtype):
    """fp32/fp64: 1e-5 of the reference's max-abs, like every exact kernel."""
    mask = torch.rand(24, 24, generator=torch.Generator().manual_seed(3)) > 0.3
    mask[:, 0] = True  # every row sees a key (fully hidden rows are the merge's business)
    for causal, m, shape in [(False, None, dict(sq=16, sk=40)), (True, None, dict(sq=24, sk=24)),
                             (True, mask, dict(sq=24, sk=24, hk=1)), (False, mask, dict(sq=24, sk=24))]:
        errs = _softcap_case("math", "cpu", dtype, causal, m, 5.0, **shape)
        assert max(errs) <= 1e-5, (causal, m is not None, errs)
    # the cap really changed the result (negative control)
    full, _ = _case("cpu", dtype, sq=16, sk=16)
    capped = reference_attention(full[0] * 4, *full[1:], causal=False, softcap=5.0)[0]
    plain = reference_attention(full[0] * 4, *full[1:], causal=False)[0]
    assert rel_err(capped, plain) > 1e-2


def test_math_row_tiles_are_exact(monkeypatch):
    """Tiny tiles (3 rows) give the same result as whole blocks: rows are independent, causal
    offsets, key cuts and mask rows follow the tile."""
    import ringattn.kernels.math as math_kernel

    mask = torch.rand(20, 20, generator=torch.Generator().manual_seed(4)) > 0.4
    mask[:, 0] = True
    monkeypatch.setattr(math_kernel, "_TILE_ROWS", 1000)
    whole = _softcap_case("math", "cpu", torch.float64, True, mask, 3.0, sq=20, sk=20)
    monkeypatch.setattr(math_kernel, "_TILE_ROWS", 3)
    tiles = math_kernel._row_tiles(torch.empty(2, 20, 8, 4), torch.empty(2, 20, 2, 4), True)
    assert len(tiles) == 7 and tiles[1] == (slice(3, 6), slice(0, 6))  # causal: keys <= row
    tiled = _softcap_case("math", "cpu", torch.float64, True, mask, 3.0, sq=20, sk=20)
    assert max(tiled) <= 1e-12 + max(whole) and max(tiled) <= 1e-10


def test_features_pick_a_capable_kernel_and_explicit_backends_name_the_missing_one():
    q = torch.empty(1, 4, 2, 64)
    assert get_backend("auto", q, softcap=30.0).name == "math"  # no fused CPU op has softcap
    assert get_backend("auto", q, mask=True).name == "sdpa"
    with pytest.raises(ValueError, match="backend 'sdpa'.*no logit softcapping"):
        get_backend("sdpa", q, softcap=30.0)
    assert not BACKENDS["sdpa"].supports_softcap and BACKENDS["flash_attn"].supports_softcap


@needs_cuda
@pytest.mark.skipif(BACKENDS["flash_attn"].supports(torch.empty(1, 1, 1, 64, dtype=torch.bfloat16,
                    device="cuda" if CUDA else "cpu")) is not None, reason="flash-attn not installed")
def test_cuda_flash_attn_softcap_close_to_math():
    """bf16 flash-attn with its native softcap vs the fp64 reference: within 2x math's bf16
    error plus one bf16 ulp (as the other 16-bit kernels)."""
    for causal in (False, True):
        errs = _softcap_case("flash_attn", "cuda", torch.bfloat16, causal, None, 5.0, sq=64, sk=64)
        base = _softcap_case("math", "cuda", torch.bfloat16, causal, None, 5.0, sq=64, sk=64)
        for e, m in zip(errs, base):
            assert e <= 2.0 * m + 2 ** -8, (causal, errs, base)


@pytest.mark.parametrize("name", ["math", "sdpa"])
def test_sinks_in_the_merge_match_reference(name):
    """Two key blocks merged, then the sinks once: out', lse' and dq, dk, dv (kernel backward
    with out', lse') and dsinks (``sinks_grad``) vs fp64 autograd through GPT-OSS's form."""
    from ringattn.merge import PartialAttention, sinks_grad

    full, (q, k, v, do) = _case("cpu", torch.float32, sq=24, sk=24)
    sinks = torch.tensor([0.5, -1.0, 2.0, 0.0, 3.0, -2.0, 1.0, 4.0])
    scale = q.shape[-1] ** -0.5
    ref = reference_attention(*full, causal=True, scale=scale, sinks=sinks)
    kern = BACKENDS[name]
    acc = PartialAttention(q, torch.float32)
    halves = (slice(0, 12), slice(12, 24))
    acc.add(*kern.forward(q, k[:, halves[0]], v[:, halves[0]], causal=False, scale=scale,
                          mask=torch.ones(24, 12, dtype=torch.bool).tril()))
    acc.add(*kern.forward(q[:, halves[1]], k[:, halves[1]], v[:, halves[1]], causal=True,
                          scale=scale), halves[1])
    acc.add_sinks(sinks)
    out, lse = acc.out.to(q.dtype), acc.lse
    dq = torch.zeros_like(q)
    dk, dv = torch.zeros_like(k), torch.zeros_like(v)
    dq0, dk[:, halves[0]], dv[:, halves[0]] = kern.backward(
        do, q, k[:, halves[0]], v[:, halves[0]], out, lse, causal=False, scale=scale,
        mask=torch.ones(24, 12, dtype=torch.bool).tril())
    dq1, dk1, dv1 = kern.backward(do[:, halves[1]], q[:, halves[1]], k[:, halves[1]], v[:, halves[1]],
                                  out[:, halves[1]], lse[:, :, halves[1]], causal=True, scale=scale)
    dq = dq0.clone()
    dq[:, halves[1]] += dq1
    dk[:, halves[1]] += dk1
    dv[:, halves[1]] += dv1
    ds = sinks_grad(do, out, lse, sinks)
    errs = [rel_err(g, r) for g, r in zip((out, lse, dq, dk, dv, ds), ref)]
    assert max(errs) <= 1e-5, errs
