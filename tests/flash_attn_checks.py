"""flash-attn's real Python package on the CPU stand-in, checked against float64.

    python -m tests.flash_attn_checks [--worlds 2,4]   # prints one JSON summary line

Run in its own process (tests/test_flash_attn_standin.py does, once per flash-attn release,
with that release first on PYTHONPATH): loading the stand-in makes ``backend="auto"`` pick
flash-attn on CPU, which no other test should see.

1. The stand-in through flash-attn's own wrappers (flash_attn_func, flash_attn_varlen_func
   and their autograd backward, which reach the compiled-module functions through
   flash-attn's Python glue and, from 2.7, its torch.library ops) in float64 against
   tests/reference.py: bottom-right causal for q_len != k_len, windows, softcap, GQA, varlen.
2. ringattn's FlashAttnBackend block forward/backward (binding by the op's schema), and over
   block shapes (tall, wide, one row, one key, zero-length varlen sequences) x windows in
   float64 against what each block means (the stand-in applies flash-attn's real rule).
3. backend="flash_attn" under ring, Ulysses and hybrid, every layout, with documents,
   windows, sinks and softcap, fp32, against the float64 reference; with which kernel ran
   each kind of block (``RingProfile.blocks``).
Tolerances: float64 stand-in vs float64 reference 1e-10 relative (both exact up to
rounding: different summation orders); fp32 kernels vs float64 1e-5 relative, as the rest of
the suite (tests/test_ring_attention.py: fp32 rounding of O(100)-term sums is ~1e-6).
"""
from __future__ import annotations

import argparse
import itertools
import json

import torch

from tests.flash_attn_standin import load_flash_attn
from tests.reference import layout_indices, reference_attention, rel_err

FP64_TOL = 1e-10
INF = float("inf")
FP32_TOL = 1e-5
DOCS = [5, 20, 1, 14, 8]  # 48 tokens: splits under every layout at P <= 4 (48 = 2 * 4 * 6)
# documents that start 1-5 tokens before a shard or zigzag-chunk boundary at P = 2 and 4
# (starts 10, 23, 31, 41; chunks of 6 at P = 4, 12 at P = 2): with a window they leave tall
# one-sided bands, which flash-attn's own rule closes unless the plan avoids them
BOUNDARY_DOCS = [10, 13, 8, 10, 7]


def _band(sq, sk, causal, window):
    """bool (sq, sk): flash-attn's bottom-right aligned causal/window rule, written out."""
    left, right = window
    i = torch.arange(sq)[:, None] + (sk - sq)
    j = torch.arange(sk)[None, :]
    ok = torch.ones(sq, sk, dtype=torch.bool)
    if causal:
        right = 0
    if left >= 0:
        ok &= j >= i - left
    if right >= 0:
        ok &= j <= i + right
    return ok


def _randn(gen, *shape):
    return torch.randn(*shape, generator=gen, dtype=torch.float64)


def _errs(got, ref):
    return max(rel_err(g, r) for g, r in zip(got, ref))


def standin_errors() -> dict:
    """{case: max relative error of out, lse, dq, dk, dv} through flash-attn's wrappers."""
    fa = load_flash_attn()
    gen = torch.Generator().manual_seed(0)
    errors = {}
    windows = [(-1, -1), (3, 0), (2, 4), (0, 0), (6, -1), (-1, 2)]
    for n, ((sq, sk), causal, window) in enumerate(itertools.product(
            [(7, 7), (5, 11)], (False, True), windows)):
        softcap, (h, hk) = (None, 2.5)[n % 2], [(4, 2), (4, 4), (4, 1)][n % 3]
        q, do = _randn(gen, 2, sq, h, 16), _randn(gen, 2, sq, h, 16)
        k, v = _randn(gen, 2, sk, hk, 16), _randn(gen, 2, sk, hk, 16)
        mask = _band(sq, sk, causal, window)
        if not bool(mask.any(dim=1).all()):
            continue  # rows that see nothing: checked below
        ref = reference_attention(q, k, v, do, causal=False, mask=mask, softcap=softcap)
        ql, kl, vl = (t.clone().requires_grad_() for t in (q, k, v))
        out, lse, _ = fa.flash_attn_func(ql, kl, vl, causal=causal, window_size=window,
                                         return_attn_probs=True,
                                         **({} if softcap is None else {"softcap": softcap}))
        out.backward(do)
        errors[f"dense sq={sq} sk={sk} causal={causal} window={window} softcap={softcap} "
               f"heads={h}/{hk}"] = _errs((out, lse, ql.grad, kl.grad, vl.grad), ref)
    # varlen: three sequences of different lengths, each with its own bottom-right band
    cu_q, cu_k = [0, 3, 8, 12], [0, 5, 11, 15]
    for causal, window, softcap in itertools.product((False, True), [(-1, -1), (2, 0), (1, 3)],
                                                     (None, 2.5)):
        mask = torch.zeros(cu_q[-1], cu_k[-1], dtype=torch.bool)
        for s in range(3):
            mask[cu_q[s]:cu_q[s + 1], cu_k[s]:cu_k[s + 1]] = _band(
                cu_q[s + 1] - cu_q[s], cu_k[s + 1] - cu_k[s], causal, window)
        q, do = _randn(gen, 1, cu_q[-1], 4, 16), _randn(gen, 1, cu_q[-1], 4, 16)
        k, v = _randn(gen, 1, cu_k[-1], 2, 16), _randn(gen, 1, cu_k[-1], 2, 16)
        ref = reference_attention(q, k, v, do, causal=False, mask=mask, softcap=softcap)
        ql, kl, vl = (t[0].clone().requires_grad_() for t in (q, k, v))
        out, lse, _ = fa.flash_attn_varlen_func(
            ql, kl, vl, torch.tensor(cu_q, dtype=torch.int32), torch.tensor(cu_k, dtype=torch.int32),
            5, 6, causal=causal, window_size=window, return_attn_probs=True,
            **({} if softcap is None else {"softcap": softcap}))
        out.backward(do[0])
        assert lse.shape == (4, cu_q[-1]), lse.shape  # varlen lse: (heads, total_q)
        got = (out[None], lse[None], ql.grad[None], kl.grad[None], vl.grad[None])
        errors[f"varlen causal={causal} window={window} softcap={softcap}"] = _errs(got, ref)
    return errors


def unequal_value_head_size_refused() -> str:
    """flash-attn's own flash_attn_func with v narrower than q/k (MLA) on the stand-in: the
    error flash_api.cpp's CHECK_SHAPE(v, ..., head_size) raises ("" if it ran)."""
    fa = load_flash_attn()
    q, v = torch.randn(1, 4, 2, 16), torch.randn(1, 4, 2, 8)
    try:
        fa.flash_attn_func(q, q, v)
    except RuntimeError as e:
        return str(e)
    return ""


def empty_rows_convention() -> bool:
    """Rows a bottom-right causal block hides entirely (q_len > k_len): out 0, lse +inf."""
    fa = load_flash_attn()
    q, k = torch.randn(1, 6, 2, 8), torch.randn(1, 4, 2, 8)
    out, lse, _ = fa.flash_attn_func(q, k, k, causal=True, return_attn_probs=True)
    return bool((out[:, :2] == 0).all() and torch.isposinf(lse[:, :, :2]).all()
                and torch.isfinite(lse[:, :, 2:]).all())


def backend_block_errors() -> dict:
    """FlashAttnBackend's own block forward/backward (backward binds by the op's schema)
    vs float64, as the ring drives it: backward with the final out and lse."""
    from ringattn.kernels import BACKENDS

    load_flash_attn()
    fb = BACKENDS["flash_attn"]
    gen = torch.Generator().manual_seed(1)
    errors = {}
    # (name, q rows, keys, causal, window, softcap, v's head size): MLA's v (8) is narrower
    # than q/k (16), which flash-attn refuses as is (flash_api.cpp: one head_size), so the
    # backend pads it; "mla wide v" pads q/k instead
    cases = [("full", 9, 9, False, None, None, 16), ("causal", 9, 9, True, None, None, 16),
             ("causal n>m", 9, 6, True, None, None, 16), ("causal n<m", 6, 9, True, None, None, 16),
             ("window", 9, 12, False, (4, 1), None, 16), ("softcap", 9, 9, True, None, 3.0, 16),
             ("varlen", 10, 12, False, (-1, 0), None, 16),
             ("mla causal", 9, 9, True, None, None, 8), ("mla window", 9, 12, False, (4, 1), 3.0, 8),
             ("mla varlen", 10, 12, False, (-1, 0), None, 8),
             ("mla wide v", 9, 9, True, None, None, 24)]
    for name, sq, sk, causal, window, softcap, dv in cases:
        q, do = _randn(gen, 1, sq, 4, 16), _randn(gen, 1, sq, 4, dv)
        k, v = _randn(gen, 1, sk, 2, 16), _randn(gen, 1, sk, 2, dv)
        segments = ((0, 4, 10), (0, 5, 12)) if name.endswith("varlen") else None
        if segments is not None:
            mask = torch.zeros(sq, sk, dtype=torch.bool)
            for s in range(2):
                (qa, qb), (ka, kb) = segments[0][s:s + 2], segments[1][s:s + 2]
                mask[qa:qb, ka:kb] = _band(qb - qa, kb - ka, False, window)
        elif causal:  # ringattn's causal: top-left aligned
            mask = torch.ones(sq, sk, dtype=torch.bool).tril()
        else:
            mask = _band(sq, sk, False, window or (-1, -1))
        ref = reference_attention(q, k, v, do, causal=False, mask=mask, softcap=softcap)
        kw = dict(causal=causal, scale=16 ** -0.5, softcap=softcap, window=window, segments=segments)
        q32, k32, v32 = (t.float() for t in (q, k, v))
        out, lse = fb.forward(q32, k32, v32, **kw)
        grads = fb.backward(do.float(), q32, k32, v32, out, lse, **kw)
        errors[name] = _errs((out, lse, *grads), ref)
    return errors


def _intended(n, m, causal, window):
    """bool (n, m): what a block means (ringattn's convention, kernels/base.py), written out:
    causal = top-left (j <= i); window = bottom-right band i + m - n - left <= j <=
    i + m - n + right, -1 unbounded."""
    i = torch.arange(n)[:, None]
    j = torch.arange(m)[None, :]
    if causal:
        return j <= i
    left, right = window
    ok = torch.ones(n, m, dtype=torch.bool)
    if left >= 0:
        ok &= j >= i + m - n - left
    if right >= 0:
        ok &= j <= i + m - n + right
    return ok


BLOCK_SHAPES = [(1, 1), (1, 6), (6, 1), (9, 2), (12, 3), (2, 9), (7, 7), (10, 4), (4, 10), (16, 5)]
BLOCK_WINDOWS = [None, (-1, -1), (0, -1), (2, -1), (5, -1), (-1, 0), (-1, 3), (-1, 7), (1, 1),
                 (3, 6), (2, 9), (0, 0), (6, 4)]


def _standin(backend):
    """Put ``backend``'s CPU stand-in in place: flash-attn's compiled module (for the rest of
    the process) or torch's flash ops (``torch_flash_on_cpu``, a context) -> a context."""
    import contextlib

    if backend == "torch_varlen":
        from tests.torch_flash_standin import torch_flash_on_cpu
        return torch_flash_on_cpu()
    if backend == "fa3":
        from tests.fa3_standin import fa3_on_cpu
        return fa3_on_cpu()
    load_flash_attn()
    return contextlib.nullcontext()


def backend_shape_errors(backend="flash_attn") -> dict:
    """``backend`` (flash_attn, torch_varlen or fa3) on its stand-in (flash-attn's real window rule) over block shapes
    (tall, wide, one row, one key) x windows and causal, dense with batch 2 and varlen with
    zero-length sequences, float64, against the block's meaning -> {case: max rel error}.
    Rows the block hides entirely: out 0 and lse not finite (+inf, as flash-attn writes)."""
    from ringattn.kernels import BACKENDS

    with _standin(backend):
        return _shape_errors(BACKENDS[backend])


def _shape_errors(fb) -> dict:
    gen = torch.Generator().manual_seed(2)
    errors = {}

    def run(name, q, k, v, do, mask, **kw):
        ref = reference_attention(q, k, v, do, causal=False, mask=mask)
        try:
            out, lse = fb.forward(q, k, v, scale=16 ** -0.5, **kw)
            grads = fb.backward(do, q, k, v, ref[0], ref[1].masked_fill(torch.isneginf(ref[1]), INF),
                                scale=16 ** -0.5, **kw)
        except RuntimeError:  # flash-attn refused the call (a TORCH_CHECK or a failed reshape)
            errors[name] = INF
            return
        seen = mask.any(dim=1)
        lse_ok = bool((~torch.isfinite(lse[:, :, ~seen])).all())
        pairs = [(g, r) for g, r in zip((out, lse[:, :, seen], *grads),
                                        (ref[0], ref[1][:, :, seen], *ref[2:])) if r.numel()]
        errors[name] = max(_errs(*zip(*pairs)), 0.0 if lse_ok else INF)

    for (n, m), window in itertools.product(BLOCK_SHAPES, BLOCK_WINDOWS):
        causal = window is None
        q, do = _randn(gen, 2, n, 4, 16), _randn(gen, 2, n, 4, 16)
        k, v = _randn(gen, 2, m, 2, 16), _randn(gen, 2, m, 2, 16)
        run(f"dense n={n} m={m} causal={causal} window={window}", q, k, v, do,
            _intended(n, m, causal, window or (-1, -1)), causal=causal, window=window)
    lengths = [[(9, 2), (3, 3)], [(0, 4), (5, 2), (1, 0), (12, 3)], [(1, 6), (6, 1)],
               [(2, 0), (0, 3)], [(1, 1), (0, 2), (1, 3)]]
    for lens, window in itertools.product(lengths, BLOCK_WINDOWS[1:]):
        qb = tuple(itertools.accumulate((a for a, _ in lens), initial=0))
        kb = tuple(itertools.accumulate((b for _, b in lens), initial=0))
        mask = torch.zeros(qb[-1], kb[-1], dtype=torch.bool)
        for s, (a, b) in enumerate(lens):
            mask[qb[s]:qb[s + 1], kb[s]:kb[s + 1]] = _intended(a, b, False, window)
        q, do = _randn(gen, 1, qb[-1], 4, 16), _randn(gen, 1, qb[-1], 4, 16)
        k, v = _randn(gen, 1, kb[-1], 2, 16), _randn(gen, 1, kb[-1], 2, 16)
        run(f"varlen {lens} window={window}", q, k, v, do, mask, causal=False, window=window,
            segments=(qb, kb))
    return errors


def missing_argument_message() -> str:
    """Binding refuses to call flash-attn without an argument its backward requires."""
    from ringattn.kernels import flash

    load_flash_attn()
    try:
        flash._call("_flash_attn_backward", {"q": None}, [])
    except TypeError as e:
        return str(e)
    return ""


def _fronts(world, backend="flash_attn"):
    import ringattn

    doors = {("ring", lay): ringattn.SequenceParallel("ring", lay, backend=backend)
             for lay in ("contiguous", "zigzag", "striped", "doc_zigzag")}
    doors.update({("ulysses", lay): ringattn.SequenceParallel("ulysses", lay, backend=backend)
                  for lay in ("contiguous", "zigzag", "striped", "doc_zigzag")})
    # world 4: 2 ring positions x 2 Ulysses ranks; world 2: a ring of one, Ulysses over both
    doors.update({("hybrid", lay): ringattn.SequenceParallel("hybrid", lay, ring_size=world // 2,
                                                             backend=backend)
                  for lay in ("contiguous", "zigzag", "striped", "doc_zigzag")})
    doors.update({("allgather", lay): ringattn.SequenceParallel("allgather", lay, backend=backend)
                  for lay in ("contiguous", "zigzag", "striped", "doc_zigzag")})
    return doors


def _doc_mask(doc_lengths, window, causal):
    doc = torch.repeat_interleave(torch.arange(len(doc_lengths)), torch.tensor(doc_lengths))
    pos = torch.arange(len(doc))
    rel = pos[None, :] - pos[:, None]
    ok = doc[:, None] == doc[None, :]
    if window[0] >= 0:
        ok &= rel >= -window[0]
    if window[1] >= 0:
        ok &= rel <= window[1]
    if causal:
        ok &= rel <= 0
    return ok


def backend_matrix(rank, world, backend="flash_attn", masks=None):
    """``backend`` (flash_attn, torch_varlen or fa3, on its stand-in) under every strategy and
    layout vs float64 -> (failures, {(backend, block kind): forward calls}, cases run).
    ``masks``: indices into the mask list below (None: all)."""
    with _standin(backend):
        return _matrix(rank, world, backend, masks)


def _matrix(rank, world, backend, chosen):
    from ringattn import profile

    seqlen = sum(DOCS)
    # (document lengths or None, window, causal, sinks, softcap, v's head size): two rows with
    # MLA's narrower v (8 against q/k's 16)
    masks = [(None, (-1, -1), True, False, None, 16), (DOCS, (-1, -1), True, False, None, 8),
             (None, (5, -1), True, True, None, 16), (DOCS, (4, 2), False, False, 4.0, 16),
             (DOCS, (3, -1), True, True, 2.0, 8), (BOUNDARY_DOCS, (7, 0), True, False, None, 16),
             (BOUNDARY_DOCS, (4, 3), False, False, None, 16),
             (BOUNDARY_DOCS, (-1, 2), False, True, None, 16)]
    failures, runs = [], 0
    prof = profile.RingProfile()
    for i, (docs, window, causal, use_sinks, softcap, dv) in enumerate(masks):
        if chosen is not None and i not in chosen:
            continue
        gen = torch.Generator().manual_seed(i)
        q, do = _randn(gen, 1, seqlen, 4, 16), _randn(gen, 1, seqlen, 4, dv)
        k, v = _randn(gen, 1, seqlen, 2, 16), _randn(gen, 1, seqlen, 2, dv)
        sinks = _randn(gen, 4) if use_sinks else None
        ref = reference_attention(q, k, v, do, causal=False, softcap=softcap, sinks=sinks,
                                  mask=_doc_mask(docs or [seqlen], window, causal))
        cu_ = None if docs is None else torch.tensor([0, *torch.tensor(docs).cumsum(0).tolist()],
                                                     dtype=torch.int32)
        for (strategy, layout), sp in _fronts(world, backend).items():
            if layout == "doc_zigzag" and not docs:
                continue  # it places tokens by document
            held = _held(sp, layout, seqlen, world, rank, docs)
            ql, kl, vl = (t[:, held].float().requires_grad_() for t in (q, k, v))
            s32 = None if sinks is None else sinks.float().requires_grad_()
            with prof:
                out, lse = sp.attention(ql, kl, vl, causal=causal, cu_seqlens=cu_, window_size=window,
                                        sinks=s32, softcap=softcap, return_lse=True)
            out.backward(do[:, held].float())
            got = [out, lse, ql.grad, kl.grad, vl.grad]
            want = [ref[0][:, held], ref[1][:, :, held], *(r[:, held] for r in ref[2:5])]
            errs = {n: rel_err(g, w) for n, g, w in zip(("out", "lse", "dq", "dk", "dv"), got, want)}
            bad = {n: e for n, e in errs.items() if not e <= FP32_TOL}
            if bad:
                failures.append((strategy, layout, docs, window, causal, use_sinks, softcap, dv, bad))
            runs += 1
    return failures, {f"{b}/{kind}": n for (b, kind), n in sorted(prof.blocks.items())}, runs


def _held(sp, layout, seqlen, world, rank, lengths):
    if sp.strategy != "hybrid":
        return layout_indices(layout, seqlen, world, rank, lengths)
    u = sp.ulysses_size
    ring_shard = layout_indices(layout, seqlen, world // u, rank // u, lengths)
    return ring_shard.chunk(u)[rank % u]


def main():
    from tests.distributed import run_distributed
    import importlib.metadata

    parser = argparse.ArgumentParser()
    parser.add_argument("--worlds", default="2")
    worlds = [int(w) for w in parser.parse_args().worlds.split(",")]
    summary = {"release": importlib.metadata.version("flash_attn"), "standin": standin_errors(),
               "empty_rows": empty_rows_convention(), "mla_refused": unequal_value_head_size_refused(), "block": backend_block_errors(),
               "shapes": backend_shape_errors(),
               "missing": missing_argument_message(), "matrix": {}}
    for world in worlds:
        per_rank = run_distributed(backend_matrix, world, timeout=300)
        summary["matrix"][world] = {"failures": [f for r in per_rank for f in r[0]],
                                    "blocks": per_rank[0][1], "runs": per_rank[0][2]}
    print(json.dumps(summary, default=str))


if __name__ == "__main__":
    main()
