"""The planner's kernel calls cover exactly the visible pairs, in a few calls per ring step,
and every call is exact under flash-attn's own window rule.

The reference here is written from the rule's definition, not from the planner's helpers:
a query at global position i sees key j iff same document (or range-mask slice), window and
causal allow it; each task is rendered the way flash-attn would run it
(``tests/task_render.py``).
"""
from __future__ import annotations

import random

import pytest
import torch

from ringattn.balance import lognormal_documents
from ringattn.layouts import get_layout
from ringattn.masking import AttentionMask, rank_steps
from ringattn.rangemask import RangeMask
from tests.task_render import render_tasks

LAYOUTS = ("contiguous", "zigzag", "striped", "doc_zigzag")


def _truth(cu, seqlen, causal, window, q_pos, k_pos):
    """bool (len(q_pos), len(k_pos)) from the definition."""
    doc = torch.zeros(seqlen, dtype=torch.int64)
    if cu is not None:
        for d in range(len(cu) - 1):
            doc[int(cu[d]):int(cu[d + 1])] = d
    i, j = q_pos[:, None], k_pos[None, :]
    ok = doc[q_pos][:, None] == doc[k_pos][None, :]
    left, right = window
    if left >= 0:
        ok &= j >= i - left
    if right >= 0:
        ok &= j <= i + right
    if causal:
        ok &= j <= i
    return ok


def _check_rank(layout, mask, truth_of, p, rank, max_calls=None):
    lay = get_layout(layout)
    cu = mask.cu_seqlens
    q_pos = lay.indices(mask.seqlen, p, rank, cu)
    steps = rank_steps(lay, mask, p, rank)
    assert len(steps) == p
    for step, tasks in enumerate(steps):
        k_pos = lay.indices(mask.seqlen, p, (rank - step) % p, cu)
        got = render_tasks(tasks, len(q_pos), len(k_pos))
        want = truth_of(q_pos, k_pos).long()
        assert torch.equal(got, want), (layout, p, rank, step, tasks)
        if max_calls is not None:
            assert len(tasks) <= max_calls, (layout, p, rank, step, len(tasks))
        for t in tasks:
            assert t.pairs is None or t.pairs == int(render_tasks([t], len(q_pos), len(k_pos)).sum())


def _random_docs(seqlen, rng, short=False):
    cuts = sorted(rng.sample(range(1, seqlen), rng.randint(1, 12 if not short else seqlen // 3)))
    return torch.tensor([0, *cuts, seqlen], dtype=torch.int32)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_documents_and_windows_are_covered_exactly_under_flash_attn_rules(layout):
    """Random documents (some starting 1-5 tokens before shard and chunk boundaries) x
    windows (L, 0), (L, R), (-1, R), (L, -1), none x causal or not, at P = 1..5."""
    rng = random.Random(0)
    for trial in range(40):
        p = rng.randint(1, 5)
        seqlen = 2 * p * rng.randint(3, 9)
        cu = _random_docs(seqlen, rng, short=trial % 4 == 0)
        if trial % 3 == 0:  # documents starting just before a chunk boundary
            chunk = seqlen // (2 * p)
            cuts = {max(1, min(seqlen - 1, b * chunk - rng.randint(1, 5))) for b in range(1, 2 * p)}
            cu = torch.tensor([0, *sorted(cuts), seqlen], dtype=torch.int32)
        causal = trial % 5 != 4
        window = rng.choice([(-1, -1), (rng.randint(0, 9), 0), (rng.randint(0, 7), rng.randint(0, 7)),
                             (-1, rng.randint(0, 5)), (rng.randint(0, 9), -1)])
        if causal and window[1] > 0:
            window = (window[0], 0)
        mask = AttentionMask.build(seqlen, causal, cu, window)

        def truth(q_pos, k_pos):
            return _truth(cu, seqlen, causal, window, q_pos, k_pos)

        for rank in range(p):
            _check_rank(layout, mask, truth, p, rank)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_range_masks_are_covered_exactly(layout):
    rng = random.Random(1)
    for trial in range(12):
        p = rng.randint(1, 4)
        seqlen = 2 * p * rng.randint(4, 10)
        cu = _random_docs(seqlen, rng)
        lens = (cu[1:] - cu[:-1]).tolist()
        masks = [RangeMask.prefix_lm(cu, [rng.randint(0, n) for n in lens]),
                 RangeMask.shared_prefix(lens[0], lens[1:]) if len(lens) > 1 else RangeMask.causal(seqlen),
                 RangeMask.chunked(seqlen, rng.randint(1, 9), cu),
                 RangeMask([(0, seqlen // 2), (seqlen // 3, seqlen)],
                           [(seqlen // 4, seqlen), (0, seqlen // 2)], ["causal", "full"])]
        for mask in masks:
            for rank in range(p):
                _check_rank(layout, mask, lambda q, k, m=mask: m.dense(q, k), p, rank)


def test_doc_zigzag_makes_few_calls_per_step_at_any_document_count():
    """Hundreds of documents at P = 16: calls per ring step stay a small constant."""
    seqlen, p = 1 << 16, 16
    cu = lognormal_documents(seqlen, mean=512, seed=3)
    assert len(cu) > 100
    for window, limit in (((-1, -1), 2), ((300, 0), 8)):
        mask = AttentionMask.build(seqlen, True, cu, window)
        for rank in (0, 7, 15):
            steps = rank_steps(get_layout("doc_zigzag"), mask, p, rank)
            assert max(len(s) for s in steps) <= limit, (window, [len(s) for s in steps])


def test_old_task_methods_warn_and_give_the_same_calls():
    """RangeMask.tasks and AttentionMask.document_tasks keep working for a release, with a
    DeprecationWarning naming their replacement."""
    from ringattn.visibility import position_tasks

    cu = torch.tensor([0, 5, 20, 32], dtype=torch.int32)
    pos = torch.arange(32)
    for old, mask in ((RangeMask.documents(cu).tasks, RangeMask.documents(cu)),
                      (AttentionMask.build(32, True, cu).document_tasks, AttentionMask.build(32, True, cu))):
        with pytest.warns(DeprecationWarning, match="position_tasks"):
            tasks = old(pos, pos)
        assert torch.equal(render_tasks(tasks, 32, 32), render_tasks(position_tasks(mask, pos, pos), 32, 32))
        assert torch.equal(render_tasks(tasks, 32, 32), _truth(cu, 32, True, (-1, -1), pos, pos).long())
