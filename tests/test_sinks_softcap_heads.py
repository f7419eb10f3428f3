"""Attention sinks (GPT-OSS), logit softcapping (Gemma 2) and uneven Ulysses head splits
through ring, Ulysses and hybrid, on real process groups, against the float64 reference.

Method and tolerance as ``test_ulysses_hybrid``: each rank runs its shard forward and
``out.backward(dout)`` and compares out, lse, dq, dk, dv (fp32: 1e-5 of the reference's
max-abs). The sinks' gradient of a rank covers only its own query rows (heads, for
Ulysses); the ranks' partials are summed (as the training engine's gradient reduction
does) and compared with the reference's whole gradient.
"""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import ringattn
from ringattn.headsplit import split_heads
from tests.distributed import run_distributed, worlds
from tests.reference import reference_attention, rel_err
from tests.test_documents_windows import cu_of, dense_mask
from tests.test_ring_attention import FP32_TOL, _inputs
from tests.test_ulysses_hybrid import _held

SOFTCAP = 4.0


def _sinks(heads):
    return torch.linspace(-2.0, 3.0, heads, dtype=torch.float64)


def _run(sp, inputs, ref, sinks=None, **kw):
    """This rank's errors; d sinks summed over the group and compared (on every rank)."""
    q, k, v, dout = inputs
    batch, seqlen, heads, _ = q.shape
    idx = _held(sp.strategy, sp.layout, seqlen, sp.world_size, sp.rank, sp.ulysses_size)
    ql, kl, vl = (t[:, idx].float().requires_grad_() for t in (q, k, v))
    s = None if sinks is None else sinks.float().requires_grad_()
    out, lse = sp.attention(ql, kl, vl, return_lse=True, sinks=s, **kw)
    out.backward(dout[:, idx].float())
    errs = {"out": rel_err(out, ref[0][:, idx]), "lse": rel_err(lse, ref[1][:, :, idx]),
            "dq": rel_err(ql.grad, ref[2][:, idx]), "dk": rel_err(kl.grad, ref[3][:, idx]),
            "dv": rel_err(vl.grad, ref[4][:, idx])}
    if sinks is not None:
        ds = s.grad.clone()
        dist.all_reduce(ds, group=sp.group)
        errs["dsinks"] = rel_err(ds, ref[5])
    return errs


def _doors(world):
    doors = [ringattn.SequenceParallel("ring", "zigzag"), ringattn.SequenceParallel("ring", "striped"),
             ringattn.SequenceParallel("ulysses", "zigzag")]
    if world == 4:
        doors.append(ringattn.SequenceParallel("hybrid", "zigzag", ring_size=2))
    elif world == 2:
        doors.append(ringattn.SequenceParallel("hybrid", "contiguous", ulysses_size=2))
    return doors


def _matrix(rank, world):
    """sinks, softcap, both, with a window and with packed documents; GQA 8 -> 2."""
    failures = []
    seqlen = 8 * world
    inputs = _inputs(0, 2, seqlen, 8, 2, 16)
    q4 = (inputs[0] * 4, *inputs[1:])  # scores of O(10): the cap bites
    sinks = _sinks(8)
    docs = [3, 8 * world - 3] if world > 1 else [3, 5]
    cases = [
        ("sinks causal", inputs, dict(sinks=sinks, causal=True), {}),
        ("sinks full", inputs, dict(sinks=sinks, causal=False), {}),
        ("softcap causal", q4, dict(softcap=SOFTCAP, causal=True), {}),
        ("both, window 3", q4, dict(sinks=sinks, softcap=SOFTCAP, causal=True),
         dict(window_size=(3, 0))),
    ]
    for name, inp, ref_kw, extra in cases:
        mask = dense_mask([seqlen], extra["window_size"], True) if "window_size" in extra else None
        ref = reference_attention(*inp, mask=mask, **ref_kw)
        kw = {n: ref_kw[n] for n in ("causal", "softcap") if n in ref_kw}
        for sp in _doors(world):
            errs = _run(sp, inp, ref, ref_kw.get("sinks"), **kw, **extra)
            if not max(errs.values()) <= FP32_TOL:
                failures.append((name, repr(sp), errs))
    # packed documents (batch 1) with sinks and softcap
    doc_inputs = tuple(t[:1] * (4 if i == 0 else 1) for i, t in enumerate(inputs))
    ref = reference_attention(*doc_inputs, causal=False, mask=dense_mask(docs, (-1, -1), True),
                              sinks=sinks, softcap=SOFTCAP)
    for sp in _doors(world):
        errs = _run(sp, doc_inputs, ref, sinks, causal=True, softcap=SOFTCAP, cu_seqlens=cu_of(docs))
        if not max(errs.values()) <= FP32_TOL:
            failures.append(("documents", repr(sp), errs))
    return failures


UNEVEN = [(5, 1, True, "zigzag"), (6, 3, True, "striped"), (7, 7, False, "zigzag"),
          (6, 2, True, "zigzag")]


def _matrix_and_uneven(rank, world):
    return _matrix(rank, world) + (_uneven(rank, world, UNEVEN) if world > 1 else [])


@pytest.mark.parametrize("world", worlds(1, 2, 4))
def test_sinks_softcap_and_uneven_heads_match_reference(world):
    """Sinks, softcap, both (window, documents) under every strategy; and Ulysses/hybrid with
    uneven heads: 5 -> 1 (MQA) at u = 2 and 4, 6 -> 3 (kv neither divides nor is a multiple
    of u), 7 -> 7, 6 -> 2, with sinks indexed by the rank's heads (one process group per
    world size for both)."""
    for rank, failures in enumerate(run_distributed(_matrix_and_uneven, world, timeout=300)):
        assert not failures, f"rank {rank}: {failures[:3]}"


def test_sinks_applied_once_not_per_block():
    """Negative control for the merge: a sink added per block would be counted P times."""
    from ringattn.merge import PartialAttention

    q, k, v, _ = (t.float() for t in _inputs(0, 1, 8, 2, 2, 4))
    sinks = torch.tensor([1.0, 2.0])
    ref = reference_attention(q, k, v, torch.zeros_like(q), causal=False, sinks=sinks)
    acc = PartialAttention(q, torch.float32)
    kern = ringattn.kernels.BACKENDS["math"]
    for half in (slice(0, 4), slice(4, 8)):
        acc.add(*kern.forward(q, k[:, half], v[:, half], causal=False, scale=0.5))
    acc.add_sinks(sinks)
    assert rel_err(acc.lse, ref[1]) <= 1e-6
    acc.add_sinks(sinks)  # a second time is wrong, visibly
    assert rel_err(acc.lse, ref[1]) > 1e-3


# ---- Ulysses for any head count ------------------------------------------------------------

def test_head_split_plan_28_over_4_kv_at_u8():
    """Qwen2.5-7B's 28 query / 4 K/V heads over 8 ranks: 4,4,4,4,3,3,3,3 query heads, each
    rank gets the K/V heads its query heads use (7 query heads per K/V head)."""
    s = split_heads(28, 4, 8)
    assert [hi - lo for lo, hi in s.q] == [4, 4, 4, 4, 3, 3, 3, 3]
    assert s.q[0] == (0, 4) and s.q[-1] == (25, 28) and s.q[4] == (16, 19)
    for (qlo, qhi), (kvlo, kvhi) in zip(s.q, s.kv):
        assert (kvlo, kvhi) == (qlo // 7, (qhi - 1) // 7 + 1)
    assert s.kv[1] == (0, 2) and s.kv_index(1) == [0, 0, 0, 1]  # heads 4..7: kv 0,0,0,1
    assert s.kv_index(0) is None  # heads 0..3 all use kv 0: the kernels' own GQA
    assert not s.even and split_heads(32, 8, 8).even
    assert split_heads(8, 2, 4).kv == ((0, 1), (0, 1), (1, 2), (1, 2))  # replication, as before
    with pytest.raises(ValueError, match="at least 8 query heads"):
        split_heads(5, 1, 8)


def _uneven(rank, world, cases):
    failures = []
    for heads, kv_heads, causal, layout in cases:
        inputs = _inputs(1, 2, 4 * world, heads, kv_heads, 8)
        sinks = _sinks(heads)
        ref = reference_attention(*inputs, causal=causal, sinks=sinks)
        doors = [ringattn.SequenceParallel("ulysses", layout)]
        if world == 4:
            doors.append(ringattn.SequenceParallel("hybrid", layout, ulysses_size=4 // 2))
        for sp in doors:
            errs = _run(sp, inputs, ref, sinks, causal=causal)
            if not max(errs.values()) <= FP32_TOL:
                failures.append(((heads, kv_heads, causal, layout), repr(sp), errs))
    return failures


@pytest.mark.slow  # 8 ranks; the quick tier checks the split without processes
def test_ulysses_28_over_4_heads_at_u8():
    """The Qwen2.5-7B head shape at u = 8 (8 gloo processes, tiny tensors)."""
    for rank, failures in enumerate(run_distributed(_uneven, 8, [(28, 4, True, "zigzag")],
                                                    timeout=300)):
        assert not failures, f"rank {rank}: {failures[:3]}"
