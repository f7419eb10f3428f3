"""attention_mass inside the SP group against a dense float64 softmax over the whole sequence.

Both compute in float64 from the same fp32 inputs, so they agree to ~1e-12; 1e-9 leaves
room for summation order while a wrong lse, a missed shard, or a mis-bucketed key is >1e-3.
"""
from __future__ import annotations

import math

import pytest
import torch

import ringattn
from ringattn.diagnostics import log_buckets
from tests.distributed import run_distributed, worlds
from tests.reference import layout_indices

TOL = 1e-9
LAYOUTS = ("contiguous", "zigzag", "striped")
S, HEADS, KV_HEADS, D, TOPK = 32, 4, 2, 8, 5
QUERIES = [0, 3, 17, 31]
SPANS = [(0, 4), (10, 20), (28, 32)]


def _inputs(batch=2):
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(batch, S, HEADS, D, generator=gen) * 2
    k = torch.randn(batch, S, KV_HEADS, D, generator=gen)
    return q, k


SOFTCAP, SINKS = 3.0, torch.tensor([0.5, -1.0, 2.0, 0.0])


def _dense(q, k, features=False):
    """float64 probabilities (b, h, S, S) of the whole causal attention (with softcap and a
    sink column, dropped after the softmax, when ``features``)."""
    kr = k.double().repeat_interleave(HEADS // KV_HEADS, dim=2)
    s = torch.einsum("bqhd,bkhd->bhqk", q.double(), kr) / math.sqrt(D)
    if features:
        s = SOFTCAP * torch.tanh(s / SOFTCAP)
    s = s.masked_fill(~torch.ones(S, S, dtype=torch.bool).tril(), float("-inf"))
    if features:
        s = torch.cat([s, SINKS.double().view(1, -1, 1, 1).expand(*s.shape[:3], 1)], dim=-1)
    return torch.softmax(s, dim=-1)[..., :S]


def _reference(features=False):
    q, k = _inputs()
    p = _dense(q, k, features)[:, :, QUERIES]  # (b, h, nq, S)
    span = torch.stack([p[..., lo:hi].sum(-1) for lo, hi in SPANS], dim=-1)
    top_p, top_pos = p.topk(TOPK, dim=-1)
    top_pos = torch.where(top_p > 0, top_pos, torch.full_like(top_pos, -1))
    edges = log_buckets(S)
    dist = (torch.tensor(QUERIES)[:, None] - torch.arange(S)[None, :]).abs()
    by = torch.zeros(HEADS, len(edges) - 1, dtype=torch.float64)  # a sink's mass is in no bucket
    for i in range(len(edges) - 1):
        inb = (dist >= edges[i]) & (dist < edges[i + 1])
        by[:, i] = (p * inb).sum((-1, -2)).mean(0) / len(QUERIES)
    return span, top_p, top_pos, by


def _run(rank, world, layouts, features=False):
    q, k = _inputs()
    kw = dict(softcap=SOFTCAP, sinks=SINKS) if features else {}
    out = []
    for layout in layouts:
        idx = layout_indices(layout, S, world, rank)
        m = ringattn.attention_mass(q[:, idx], k[:, idx], idx, QUERIES, spans=SPANS, top_k=TOPK, **kw)
        out.append((layout, m))
    return out


def _both(rank, world, layouts):
    return _run(rank, world, layouts), _run(rank, world, layouts[:1], features=True)


def _check(results, features=False):
    span, top_p, top_pos, by = _reference(features)
    if not features:  # the reference is a distribution
        assert by.sum(-1).allclose(torch.ones(HEADS, dtype=torch.float64))
    for per_rank in results:
        for layout, m in per_rank:
            assert (m.span_mass - span).abs().max() <= TOL, layout
            assert (m.top_probs - top_p).abs().max() <= TOL, layout
            assert torch.equal(m.top_positions, top_pos), layout
            assert (m.distance_mass - by).abs().max() <= TOL, layout


def test_attention_mass_single_process():
    _check([_run(0, 1, ["contiguous"])])
    _check([_run(0, 1, ["contiguous"], features=True)], features=True)


@pytest.mark.parametrize("world", worlds(2, 4))
def test_attention_mass_matches_dense_reference(world):
    results = run_distributed(_both, world, LAYOUTS)
    _check([plain for plain, _ in results])
    _check([with_features for _, with_features in results], features=True)  # softcap and sinks


def test_attention_mass_refuses_bad_queries():
    q, k = _inputs()
    with pytest.raises(ValueError, match="not held by exactly one rank"):
        ringattn.attention_mass(q, k, torch.arange(S), [S + 3])
    with pytest.raises(ValueError, match="positions must be"):
        ringattn.attention_mass(q, k, torch.arange(S - 1), [1])
