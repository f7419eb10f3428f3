"""Packed documents (cu_seqlens) and sliding windows under ring attention, every layout.

The reference applies the block-diagonal (and window) mask on the full sequence in
float64, written independently of ringattn.masking: a dense boolean matrix built from
the document lengths. Tolerance as in test_ring_attention: fp32 within 1e-5 of the
reference's max-abs.
"""
from __future__ import annotations

import pytest
import torch

import ringattn
from ringattn import profile
from tests.distributed import run_distributed, worlds
from tests.reference import layout_indices, reference_attention, rel_err

LAYOUTS = ("contiguous", "zigzag", "striped", "doc_zigzag")  # doc_zigzag: document cases only
FP32_TOL = 1e-5
# awkward document lengths (tiny, odd, longer than a shard), plus 8 so that 4248 = 24 * 177
# splits under every layout, P <= 4
AWKWARD_DOCS = [1, 7, 120, 1128, 2984, 8]
# documents shorter than 2P tokens among longer ones (72 tokens)
SHORT_DOCS = [3, 2, 7, 1, 5, 30, 6, 2, 1, 15]


def dense_mask(doc_lengths, window, causal):
    """bool (S, S): same document, within the window, and causal if asked."""
    doc = torch.repeat_interleave(torch.arange(len(doc_lengths)), torch.tensor(doc_lengths))
    pos = torch.arange(len(doc))
    rel = pos[None, :] - pos[:, None]  # key - query
    visible = doc[:, None] == doc[None, :]
    left, right = window
    if left >= 0:
        visible &= rel >= -left
    if right >= 0:
        visible &= rel <= right
    if causal:
        visible &= rel <= 0
    return visible


def cu_of(doc_lengths):
    return torch.tensor([0, *torch.tensor(doc_lengths).cumsum(0).tolist()], dtype=torch.int32)


def _case(seed, doc_lengths, window, causal, use_docs, heads, dim=16):
    """Full float64 inputs and the reference (computed once, shared by all layouts)."""
    seqlen = sum(doc_lengths)
    gen = torch.Generator().manual_seed(seed)
    h, hk = heads
    q = torch.randn(1, seqlen, h, dim, generator=gen, dtype=torch.float64)
    k = torch.randn(1, seqlen, hk, dim, generator=gen, dtype=torch.float64)
    v = torch.randn(1, seqlen, hk, dim, generator=gen, dtype=torch.float64)
    dout = torch.randn(1, seqlen, h, dim, generator=gen, dtype=torch.float64)
    lengths = doc_lengths if use_docs else [seqlen]
    ref = reference_attention(q, k, v, dout, causal=False, mask=dense_mask(lengths, window, causal))
    return (q, k, v, dout), ref


def _ring_errors(rank, world, layout, causal, inputs, ref, window, cu):
    q, k, v, dout = inputs
    idx = layout_indices(layout, q.shape[1], world, rank,
                         None if cu is None else (cu[1:] - cu[:-1]).tolist())
    ql, kl, vl = (t[:, idx].float().requires_grad_() for t in (q, k, v))
    out, lse = ringattn.ring_attention(ql, kl, vl, causal=causal, layout=layout, return_lse=True,
                                       window_size=window, cu_seqlens=cu)
    out.backward(dout[:, idx].float())
    got = (out, lse, ql.grad, kl.grad, vl.grad)
    return {n: rel_err(g, w[:, :, idx] if n == "lse" else w[:, idx])
            for n, g, w in zip(("out", "lse", "dq", "dk", "dv"), got, ref)}


def _cases(world):
    shard = 240 // world
    mid_docs = [5, 90, 1, 64, 80]  # 240 tokens
    cases = [(AWKWARD_DOCS, (-1, -1), True), ([240], (-1, -1), True), ([1] * 48, (-1, -1), True),
             (SHORT_DOCS, (-1, -1), True)]
    for left in (0, 1, 5, shard, 1000):
        for docs in (True, False):
            cases.append((mid_docs, (left, -1), docs))           # causal-style left window
            cases.append((mid_docs, (left, min(left, 3)), docs))  # two-sided window
    return cases


def _matrix(rank, world):
    failures = []
    for i, (docs, window, use_docs) in enumerate(_cases(world)):
        heads = (2, 1) if docs is AWKWARD_DOCS else (4, 2)
        for causal in (False, True):
            inputs, ref = _case(i, docs, window, causal, use_docs, heads)
            cu = cu_of(docs) if use_docs else None
            for layout in LAYOUTS:
                if layout == "doc_zigzag" and cu is None:
                    continue  # it places tokens by document: needs cu_seqlens
                errs = _ring_errors(rank, world, layout, causal, inputs, ref, window, cu)
                bad = {n: e for n, e in errs.items() if not e <= FP32_TOL}
                if bad:
                    failures.append(((layout, causal, len(docs), window, use_docs), bad))
    return failures


# world 1 is slow too: the single-process matrix is the largest (the quick tier keeps P=2)
# P = 2 and an odd P (3): four ranks add nothing the two do not check, for twice the time
@pytest.mark.parametrize("world", [pytest.param(1, marks=pytest.mark.slow), *worlds(2, 3)])
def test_documents_and_windows_match_reference(world):
    for rank, failures in enumerate(run_distributed(_matrix, world, timeout=600)):
        assert not failures, f"rank {rank}: {len(failures)} cases beyond {FP32_TOL}: {failures[:4]}"


def _profiled(rank, world, layout, causal, window, doc_lengths=None, seqlen=64):
    q = torch.randn(1, seqlen // world, 2, 8, requires_grad=True)
    cu = cu_of(doc_lengths) if doc_lengths else None
    with profile.RingProfile() as fwd:
        out = ringattn.ring_attention(q, q, q, causal=causal, layout=layout, window_size=window,
                                      cu_seqlens=cu)
    with profile.RingProfile() as plain:
        ringattn.ring_attention(q, q, q, causal=causal, layout=layout)
    out.sum().backward()
    return fwd, plain


def _stats(rank, world, *args, **kwargs):
    fwd, plain = _profiled(rank, world, *args, **kwargs)
    return (fwd.ring_steps, fwd.kernel_calls, fwd.scores, fwd.bytes_sent), \
        (plain.ring_steps, plain.kernel_calls, plain.scores, plain.bytes_sent)


def _early_stop_cases(rank, world):
    return {
        # window shorter than a 16-token shard: only the previous rank's K/V is needed
        "short": _stats(rank, world, "contiguous", True, (5, -1)),
        # window 0: every query sees itself only, the ring never turns
        "zero": _stats(rank, world, "contiguous", True, (0, -1)),
        # window longer than a shard: two previous ranks
        "long": _stats(rank, world, "contiguous", True, (20, -1)),
        # documents equal to the shards: only diagonal blocks have work
        "docs": _stats(rank, world, "contiguous", False, (-1, -1), [16, 16, 16, 16]),
        # zigzag with documents: every step still runs, but masked-out blocks are skipped
        "zigzag_docs": _stats(rank, world, "zigzag", True, (-1, -1), [8, 24, 8, 24]),
    }


@pytest.mark.slow  # 4 ranks
def test_ring_stops_early_and_skips_masked_blocks():
    results = run_distributed(_early_stop_cases, 4, timeout=180)
    for rank, res in enumerate(results):
        (steps, calls, scores, sent), (p_steps, p_calls, p_scores, p_sent) = res["short"]
        assert (steps, p_steps) == (2, 4), (rank, res["short"])
        assert sent == p_sent / 3  # one K/V hop instead of three
        assert res["zero"][0][0] == 1 and res["zero"][0][3] == 0
        assert res["long"][0][0] == 3
        steps, calls, scores, sent = res["docs"][0]
        assert steps == 1 and calls == 1 and scores == 2 * 16 * 16, res["docs"]
        steps, calls, scores, sent = res["zigzag_docs"][0]
        assert steps == 4 and scores < res["zigzag_docs"][1][2], res["zigzag_docs"]


def _bad_cu(rank, world, cu, batch=1):
    q = torch.randn(batch, 8, 2, 8)
    try:
        ringattn.ring_attention(q, q, q, causal=True, cu_seqlens=cu)
    except ValueError as e:
        return str(e)
    return None


@pytest.mark.parametrize("cu, match", [
    (torch.tensor([0, 4, 8], dtype=torch.int64), "must be an int32 tensor"),
    (torch.tensor([1, 4, 8], dtype=torch.int32), "must start at 0"),
    (torch.tensor([0, 4, 4, 8], dtype=torch.int32), "strictly increasing"),
    (torch.tensor([0, 6, 4, 8], dtype=torch.int32), "strictly increasing"),
    (torch.tensor([0, 4, 7], dtype=torch.int32), "must end at the full packed sequence length 8"),
    (torch.tensor([[0, 8]], dtype=torch.int32), "must be 1-D"),
])
def test_invalid_cu_seqlens(cu, match):
    msg = _bad_cu(0, 1, cu)
    assert msg is not None and pytest.importorskip("re").search(match, msg), msg


def test_packed_documents_need_batch_one_and_valid_windows():
    assert "needs batch size 1" in _bad_cu(0, 1, torch.tensor([0, 8], dtype=torch.int32), batch=2)
    q = torch.randn(1, 8, 2, 8)
    with pytest.raises(ValueError, match="window_size entries must be >= 0, or -1"):
        ringattn.ring_attention(q, q, q, window_size=(-2, 0))
    with pytest.raises(ValueError, match="window_size must be a pair"):
        ringattn.ring_attention(q, q, q, window_size=3)


def _cu_differs(rank, world):
    q = torch.randn(1, 8, 2, 8)
    cu = torch.tensor([0, 4 + rank, 16], dtype=torch.int32)
    try:
        ringattn.ring_attention(q, q, q, causal=True, cu_seqlens=cu)
    except ValueError as e:
        return str(e)


def test_cu_seqlens_differing_across_ranks_is_an_error():
    for msg in run_distributed(_cu_differs, 2, timeout=120):
        assert msg and "cu_seqlens differs across the ranks" in msg


def test_document_positions_restart_per_document():
    pos = ringattn.document_positions(cu_of([3, 1, 4]))
    assert pos.tolist() == [0, 1, 2, 0, 0, 1, 2, 3]
