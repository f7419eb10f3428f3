"""layout='doc_zigzag' (per-document head-tail) and the balance numbers of ringattn.balance.

Ring exactness over the document matrix lives in test_documents_windows.py (doc_zigzag is
one of its layouts); here: placement, the front door (shard/unshard/positions with
cu_seqlens) under ring, Ulysses and hybrid against float64, the plan (no masked tiles, no
wasted pairs) and the balance target (max/mean work <= 1.05 at P=8).
"""
from __future__ import annotations

import random

import pytest
import torch

import ringattn
from ringattn import balance
from ringattn.layouts import get_layout
from ringattn.masking import AttentionMask
from tests.distributed import run_distributed
from tests.reference import layout_indices, rel_err
from tests.test_documents_windows import AWKWARD_DOCS, FP32_TOL, SHORT_DOCS, _case, cu_of

LAY = get_layout("doc_zigzag")


def _random_docs(rng, world):
    docs = [rng.choice([1, 2, 3, 5, 17, 40, 100]) for _ in range(rng.randint(1, 12))]
    if sum(docs) % world:
        docs.append(world - sum(docs) % world)
    return docs


@pytest.mark.parametrize("world", range(1, 9))
def test_placement_partitions_equally_and_matches_definition(world):
    rng = random.Random(world)
    for _ in range(40):
        docs = _random_docs(rng, world)
        seqlen, cu = sum(docs), cu_of(docs)
        held = [LAY.indices(seqlen, world, r, cu) for r in range(world)]
        assert all(len(h) == seqlen // world for h in held), (docs, [len(h) for h in held])
        assert torch.equal(torch.sort(torch.cat(held)).values, torch.arange(seqlen))
        for r, h in enumerate(held):
            assert torch.equal(h, layout_indices("doc_zigzag", seqlen, world, r, docs))
        sizes = LAY.chunk_sizes(cu, world)
        assert (sizes.max(1).values - sizes.min(1).values <= 1).all()  # chunks differ by <= 1
        assert torch.equal(sizes.sum(1), torch.tensor(docs))


def test_needs_cu_seqlens_everywhere():
    x = torch.randn(1, 8, 2, 4)
    with pytest.raises(ValueError, match="'doc_zigzag' places tokens by document: pass cu_seqlens"):
        ringattn.shard(x, layout="doc_zigzag")
    with pytest.raises(ValueError, match="pass cu_seqlens"):
        ringattn.positions(8, layout="doc_zigzag")
    with pytest.raises(ValueError, match="pass cu_seqlens"):
        ringattn.ring_attention(x, x, x, causal=True, layout="doc_zigzag")
    with pytest.raises(ValueError, match="pass cu_seqlens"):
        ringattn.SequenceParallel("ring", "doc_zigzag").unshard(x)
    with pytest.raises(ValueError, match="must end at the full packed sequence length 8"):
        ringattn.shard(x, layout="doc_zigzag", cu_seqlens=torch.tensor([0, 4, 7], dtype=torch.int32))
    # one process: the shard is the whole sequence
    cu = cu_of([3, 5])
    assert torch.equal(ringattn.shard(x, layout="doc_zigzag", cu_seqlens=cu), x)


def _front_door(rank, world, strategy, ulysses_size):
    sp = ringattn.SequenceParallel(strategy, "doc_zigzag",
                                   ulysses_size=ulysses_size if strategy == "hybrid" else None)
    errs = []
    for i, docs in enumerate((AWKWARD_DOCS, SHORT_DOCS, [1] * 48)):
        cu = cu_of(docs)
        (q, k, v, dout), ref = _case(i, docs, (-1, -1), True, True, (4, 2))
        ql, kl, vl = (sp.shard(t, cu_seqlens=cu).float().requires_grad_() for t in (q, k, v))
        out, lse = sp.attention(ql, kl, vl, causal=True, cu_seqlens=cu, return_lse=True)
        out.backward(sp.shard(dout, cu_seqlens=cu).float())
        # unshard puts every rank's shard back in position order: compare full tensors
        full = [sp.unshard(t.detach(), cu_seqlens=cu) for t in (out, ql.grad, kl.grad, vl.grad)]
        full_lse = sp.unshard(lse.detach(), dim=2, cu_seqlens=cu)
        errs.append(max(rel_err(full[0], ref[0]), rel_err(full_lse, ref[1]),
                        *(rel_err(g, w) for g, w in zip(full[1:], ref[2:]))))
        doc_pos = ringattn.document_positions(cu)
        assert torch.equal(sp.positions(len(doc_pos), cu_seqlens=cu), sp.shard(doc_pos, dim=0, cu_seqlens=cu))
    return errs


# Ulysses alone over 4 ranks is hybrid's inner all-to-all at u = 4: the hybrid case covers it
@pytest.mark.parametrize("world, strategy, u", [(2, "ring", 1), pytest.param(4, "hybrid", 2, marks=pytest.mark.slow)])
def test_front_door_exact_ring_hybrid_ulysses(world, strategy, u):
    for rank, errs in enumerate(run_distributed(_front_door, world, strategy, u, timeout=300)):
        assert max(errs) <= FP32_TOL, (rank, errs)


def test_plan_has_no_masked_tiles_and_no_wasted_pairs():
    cu = balance.lognormal_documents(4032, mean=512, seed=1)  # 4032: divisible by 2, 3, 4
    for world in (2, 3, 4):
        work = balance.scheduled_work(cu, "doc_zigzag", world)
        assert work.masked_share == 0.0
        assert torch.equal(work.kernel, work.needed)  # every computed pair is a visible one
        assert balance.imbalance(work.needed) < 1.01
    striped = balance.scheduled_work(cu, "striped", 2)
    # documents cut through every striped block, but each document's part of a block is a
    # band in local indices: varlen tasks of bands, no masked tile, no wasted pair
    assert striped.masked_share == 0.0 and torch.equal(striped.kernel, striped.needed)


def test_rank_work_counts_visible_pairs():
    cu = cu_of([3, 5])  # causal pairs: 3*4/2 + 5*6/2 = 21
    for layout in ("contiguous", "zigzag", "striped"):
        assert int(balance.rank_work(cu, layout, 1).sum()) == 21
    assert balance.rank_work(cu_of([4, 4]), "contiguous", 2).tolist() == [10, 10]
    assert balance.rank_work(cu_of([8]), "contiguous", 2).tolist() == [10, 26]


def test_balance_target_lognormal_p8():
    """The balance target: log-normal documents (mean 4K, sigma 1), 128K sequences, P=8: <= 1.05."""
    for seed in range(10):
        cu = balance.lognormal_documents(131072, mean=4096, sigma=1.0, seed=seed)
        assert balance.imbalance(balance.rank_work(cu, "doc_zigzag", 8)) <= 1.05, seed
        steps = balance.step_work(AttentionMask.build(131072, True, cu), "doc_zigzag", 8)
        assert torch.equal(steps.sum(1), balance.rank_work(cu, "doc_zigzag", 8))
        assert balance.lockstep_imbalance(steps) <= 1.05, seed
    assert balance.imbalance(balance.rank_work(cu, "zigzag", 8)) > 1.2  # the problem it solves
