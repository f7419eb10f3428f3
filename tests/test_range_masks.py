"""Range masks (``ringattn.RangeMask``) under every strategy and layout, and their balance.

The reference is float64 attention with a dense (S, S) mask built here, in the test only,
straight from the slices as given (q range x k range, and key <= query for "causal"),
independently of ringattn's normalisation. Tolerance: fp32 inputs within 1e-5 of the
reference's max-abs (as test_ring_attention: fp32 accumulation over <= 48 keys per row).
Rows a mask hides entirely must give out 0, lse -inf and zero gradients.
"""
from __future__ import annotations

import random

import pytest
import torch

import ringattn
from ringattn import RangeMask
from ringattn.balance import imbalance, lockstep_imbalance, mask_work, step_work
from ringattn.layouts import get_layout
from ringattn.masking import rank_steps
from tests.task_render import render_tasks
from tests.distributed import run_distributed, worlds
from tests.reference import reference_attention, rel_err

FP32_TOL = 1e-5
SEQLEN = 48  # splits under zigzag at P = 4 and hybrid 2 x 2
LAYOUTS = ("contiguous", "zigzag", "striped", "doc_zigzag")
STRATEGIES = ("ring", "ulysses", "hybrid", "allgather")


def dense_of(mask: RangeMask) -> torch.Tensor:
    """bool (S, S), True = visible: the union of the slices as given."""
    s = mask.seqlen
    out = torch.zeros(s, s, dtype=torch.bool)
    below = torch.ones(s, s, dtype=torch.bool).tril()
    for (qa, qb), (ka, kb), kind in zip(*mask.given):
        box = torch.zeros(s, s, dtype=torch.bool)
        box[qa:qb, ka:kb] = True
        out |= box & below if kind == "causal" else box
    return out


def random_mask(seed: int, seqlen: int, slices: int) -> RangeMask:
    rng = random.Random(seed)
    q, k, kinds = [], [], []
    for _ in range(slices):
        a = rng.randrange(seqlen)
        c = rng.randrange(seqlen)
        q.append((a, rng.randint(a + 1, seqlen)))
        k.append((c, rng.randint(c + 1, seqlen)))
        kinds.append(rng.choice(["full", "causal"]))
    return RangeMask(q, k, kinds, seqlen)


def masks() -> dict[str, RangeMask]:
    cu = torch.tensor([0, 5, 20, 21, 48], dtype=torch.int32)
    return {
        "causal": RangeMask.causal(SEQLEN),
        "documents": RangeMask.documents(cu),
        "bidirectional_documents": RangeMask.bidirectional_documents(cu),
        "prefix_lm": RangeMask.prefix_lm(torch.tensor([0, 20, 30, 48]), [7, 0, 18]),
        "shared_prefix": RangeMask.shared_prefix(10, [9, 1, 20, 8]),
        "chunked": RangeMask.chunked(SEQLEN, 7),
        "chunked_documents": RangeMask.chunked(SEQLEN, 5, torch.tensor([0, 20, 48])),
        # rows 10..29 and 40..47 see nothing: under contiguous at P = 4 rank 1 has no work
        "hidden_rows": RangeMask([(0, 10), (30, 40)], [(0, 48), (20, 25)], ["causal", "full"]),
        "random_a": random_mask(1, SEQLEN, 12),
        "random_b": random_mask(2, SEQLEN, 5),
    }


# --- single-process: normalisation, tasks, validation, balance -----------------------------

def _covered(tasks, n_q, n_k) -> torch.Tensor:
    """How often each (q row, k row) pair is computed by ``tasks``."""
    hits = torch.zeros(n_q, n_k, dtype=torch.int64)
    for t in tasks:
        rows, cols = range(*t.q_rows.indices(n_q)), range(*t.k_rows.indices(n_k))
        box = torch.ones(len(rows), len(cols), dtype=torch.int64)
        if t.causal:
            box = box.tril()
        if t.mask is not None:
            box = box * t.mask
        hits[rows.start:rows.stop, cols.start:cols.stop] += box
    return hits


def test_tasks_compute_each_visible_pair_exactly_once():
    """Every layout's ring steps (as flash-attn would run them) cover each visible pair once."""
    cases = [*masks().values(), *(random_mask(s, 32, 1 + s % 9) for s in range(12))]
    for mask in cases:
        want = dense_of(mask)
        pos = torch.arange(mask.seqlen)
        for layout in LAYOUTS:
            lay = get_layout(layout)
            for p in (2, 4):
                if mask.seqlen % (2 * p):
                    continue
                held = [lay.indices(mask.seqlen, p, r, mask.cu_seqlens) for r in range(p)]
                for rank, qp in enumerate(held):
                    for step, tasks in enumerate(rank_steps(lay, mask, p, rank)):
                        kp = held[(rank - step) % p]
                        sub = want[qp][:, kp]
                        assert torch.equal(render_tasks(tasks, len(qp), len(kp)), sub.long()), \
                            (mask.given, layout, p)
                    for kp in (*held, pos):
                        sub = want[qp][:, kp]
                        assert torch.equal(mask.visible(qp, kp), sub.sum(1))
                        assert torch.equal(mask.dense(qp, kp), sub)


def test_normalised_slices_are_few_and_disjoint():
    # a causal diagonal over one range is one unmasked kernel call per rank block
    one = rank_steps(get_layout("contiguous"), RangeMask.causal(16), 1, 0)[0]
    assert [(t.causal, t.mask, t.window, t.segments) for t in one] == [(True, None, None, None)]
    # overlapping full and causal slices: full wins, and it is still one slice
    m = RangeMask([(0, 8), (0, 8)], [(0, 8), (0, 8)], ["causal", "full"])
    assert m.slices == ((0, 8, 0, 8, False),)
    # a million tokens of 1000 documents stays 1000 slices
    docs = RangeMask.documents(torch.arange(0, 1_000_001, 1000))
    assert len(docs.slices) == 1000 and docs.seqlen == 1_000_000


@pytest.mark.parametrize("args, message", [
    (([(0, 4)], [(0, 4)], ["sideways"]), "kinds\\[0\\] = 'sideways'"),
    (([(0, 4)], [(3, 3)], ["full"]), "k_ranges\\[0\\] = \\[3, 3\\) is empty"),
    (([(-1, 4)], [(0, 4)], ["full"]), "q_ranges\\[0\\] = \\[-1, 4\\) starts before 0"),
    (([(0, 4), (1, 2)], [(0, 4)], ["full"]), "one entry per slice"),
    (([(0, 4, 5)], [(0, 4)], ["full"]), "shape \\(n, 2\\)"),
    (([(0.5, 4)], [(0, 4)], ["full"]), "must hold integers"),
    (([], [], []), "no slices"),
])
def test_bad_range_masks_name_the_problem(args, message):
    with pytest.raises(ValueError, match=message):
        RangeMask(*args)


def test_bad_constructor_arguments_and_seqlen():
    with pytest.raises(ValueError, match="beyond seqlen=4"):
        RangeMask([(0, 8)], [(0, 8)], ["full"], seqlen=4)
    with pytest.raises(ValueError, match="prefix_lens\\[0\\] = 9"):
        RangeMask.prefix_lm(torch.tensor([0, 5]), [9])
    with pytest.raises(ValueError, match="strictly increasing"):
        RangeMask.documents(torch.tensor([0, 5, 5]))
    with pytest.raises(ValueError, match="response length"):
        RangeMask.shared_prefix(4, [3, 0])
    with pytest.raises(ValueError, match="chunk must be >= 1"):
        RangeMask.chunked(8, 0)


def test_constructors_draw_their_pictures():
    pic = lambda m: ["".join("x" if v else "." for v in row) for row in dense_of(m).tolist()]  # noqa: E731
    assert pic(RangeMask.shared_prefix(2, [2, 1])) == ["x....", "xx...", "xxx..", "xxxx.", "xx..x"]
    assert pic(RangeMask.prefix_lm(torch.tensor([0, 4]), [2])) == ["xx..", "xx..", "xxx.", "xxxx"]
    assert pic(RangeMask.chunked(4, 2)) == ["x...", "xx..", "..x.", "..xx"]
    assert pic(RangeMask.bidirectional_documents(torch.tensor([0, 1, 3]))) == ["x..", ".xx", ".xx"]
    # normalisation keeps the picture
    for m in masks().values():
        pos = torch.arange(m.seqlen)
        assert torch.equal(m.dense(pos, pos), dense_of(m))


def _shared_prompt_batch(p):
    gen = torch.Generator().manual_seed(0)
    responses = torch.randint(100, 2000, (12,), generator=gen).tolist()
    responses[-1] += -(3000 + sum(responses)) % (2 * p)
    return RangeMask.shared_prefix(3000, responses)


def _prefix_lm_batch(p):
    gen = torch.Generator().manual_seed(1)
    lengths = torch.randint(500, 6000, (10,), generator=gen)
    lengths[-1] += -int(lengths.sum()) % (2 * p)
    prefixes = [int(torch.randint(0, int(n), (1,), generator=gen)) for n in lengths]
    return RangeMask.prefix_lm(torch.cat([torch.zeros(1), lengths.cumsum(0)]).long(), prefixes)


def test_doc_zigzag_balances_shared_prompt_and_prefix_lm_at_p8():
    for mask in (_shared_prompt_batch(8), _prefix_lm_batch(8)):
        work = mask_work(mask, "doc_zigzag", 8)
        assert imbalance(work) <= 1.05, (mask, work)
        # in lock-step too: every ring step, not only every rank's total
        steps = step_work(mask, "doc_zigzag", 8)
        assert torch.equal(steps.sum(1), work)
        assert lockstep_imbalance(steps) <= 1.05, (mask, steps)
        # the work adds up to the mask's visible pairs whatever the layout
        assert int(work.sum()) == int(mask_work(mask, "contiguous", 8).sum())
    # the plain zigzag does not balance them (why doc_zigzag follows the mask's segments)
    assert imbalance(mask_work(_prefix_lm_batch(8), "zigzag", 8)) > 1.2


# --- every strategy x layout x mask on real process groups -----------------------------

def _inputs(seed, heads=(4, 2), dim=8):
    gen = torch.Generator().manual_seed(seed)
    h, hk = heads
    q = torch.randn(1, SEQLEN, h, dim, generator=gen, dtype=torch.float64)
    k = torch.randn(1, SEQLEN, hk, dim, generator=gen, dtype=torch.float64)
    v = torch.randn(1, SEQLEN, hk, dim, generator=gen, dtype=torch.float64)
    dout = torch.randn(1, SEQLEN, h, dim, generator=gen, dtype=torch.float64)
    return q, k, v, dout


def _errors(sp, mask, inputs, ref, placement, use_plan):
    q, k, v, dout = inputs
    ql, kl, vl = (sp.shard(t, cu_seqlens=placement).float().requires_grad_() for t in (q, k, v))
    plan = sp.prepare(ql.shape, mask=mask) if use_plan else None
    out, lse = sp.attention(ql, kl, vl, mask=mask, return_lse=True, plan=plan)
    out.backward(sp.shard(dout, cu_seqlens=placement).float())
    want_lse = sp.shard(ref[1], dim=2, cu_seqlens=placement)
    hidden = torch.isneginf(want_lse)
    errs = {"lse_hidden": 0.0 if torch.equal(torch.isneginf(lse), hidden) else 1.0,
            "lse": rel_err(lse.masked_fill(hidden, 0), want_lse.masked_fill(hidden, 0))}
    for name, got, want in zip(("out", "dq", "dk", "dv"), (out, ql.grad, kl.grad, vl.grad),
                               (ref[0], *ref[2:5])):
        errs[name] = rel_err(got, sp.shard(want, cu_seqlens=placement))
    return errs


def _matrix(rank, world):
    doors = {}
    for strategy in STRATEGIES:
        for layout in LAYOUTS:
            sizes = {"ulysses_size": 2 if world == 4 else world} if strategy == "hybrid" else {}
            doors[(strategy, layout)] = ringattn.SequenceParallel(strategy, layout, **sizes)
    failures, checked = [], 0
    for i, (name, mask) in enumerate(masks().items()):
        inputs = _inputs(i)
        ref = reference_attention(*inputs, causal=False, mask=dense_of(mask))
        for (strategy, layout), sp in doors.items():
            if world == 1 and (strategy, layout) != ("ring", "contiguous"):
                continue  # one process: every door is the same local attention
            placement = mask.cu_seqlens if layout == "doc_zigzag" else None
            errs = _errors(sp, mask, inputs, ref, placement, use_plan=i % 2 == 0)
            checked += 1
            bad = {n: e for n, e in errs.items() if not e <= FP32_TOL}
            if bad:
                failures.append((name, strategy, layout, bad))
    if world > 1:
        failures += _allgather_without_range_masks(world)
    return failures, checked


def _allgather_without_range_masks(world):
    """The all-gather strategy with the other rules: causal, documents, windows, sinks, softcap."""
    cu = torch.tensor([0, 5, 20, 21, 48], dtype=torch.int32)
    doc = torch.repeat_interleave(torch.arange(4), (cu[1:] - cu[:-1]).long())
    pos = torch.arange(SEQLEN)
    same_doc = doc[:, None] == doc[None, :]
    window = (pos[None, :] >= pos[:, None] - 6) & (pos[None, :] <= pos[:, None] + 2)
    failures = []
    for layout in LAYOUTS:
        sp = ringattn.SequenceParallel("allgather", layout)
        for i, (causal, docs, win, extras) in enumerate([
                (True, False, (-1, -1), {}), (False, True, (-1, -1), {}), (True, True, (6, 2), {}),
                (True, False, (-1, -1), {"softcap": 3.0, "sinks": torch.linspace(-1, 1, 4, dtype=torch.float64)})]):
            if layout == "doc_zigzag" and not docs:
                continue
            q, k, v, dout = _inputs(100 + i)
            dense = (same_doc if docs else torch.ones_like(same_doc)) & (window if win[0] >= 0 else True)
            ref = reference_attention(q, k, v, dout, causal=causal, mask=dense, **extras)
            place = cu if docs else None
            ql, kl, vl = (sp.shard(t, cu_seqlens=place).float().requires_grad_() for t in (q, k, v))
            kw = {n: (x.float() if n == "sinks" else x) for n, x in extras.items()}
            out, lse = sp.attention(ql, kl, vl, causal=causal, cu_seqlens=place, window_size=win,
                                    return_lse=True, **kw)
            out.backward(sp.shard(dout, cu_seqlens=place).float())
            got = (out, lse, ql.grad, kl.grad, vl.grad)
            errs = {n: rel_err(g, sp.shard(w, dim=2 if n == "lse" else 1, cu_seqlens=place))
                    for n, g, w in zip(("out", "lse", "dq", "dk", "dv"), got, ref)}
            bad = {n: e for n, e in errs.items() if not e <= FP32_TOL}
            if bad:
                failures.append(("allgather", layout, causal, docs, win, list(extras), bad))
    return failures


@pytest.mark.parametrize("world", worlds(1, 2, 4))
def test_range_masks_match_reference_every_strategy_and_layout(world):
    results = run_distributed(_matrix, world, timeout=600)
    for rank, (failures, checked) in enumerate(results):
        assert checked >= (len(masks()) if world == 1 else len(masks()) * 16)
        assert not failures, f"rank {rank}: {len(failures)} cases beyond {FP32_TOL}: {failures[:4]}"


def _refusals(rank, world):
    sp = ringattn.SequenceParallel("ring", "zigzag")
    mask, other = RangeMask.causal(16), RangeMask.chunked(16, 4)
    x = torch.randn(1, 16 // world, 2, 8)
    plan = sp.prepare(x.shape, mask=mask)
    errors = []
    for call in (lambda: sp.attention(x, x, x, mask=mask, causal=True, plan=plan),
                 lambda: sp.attention(x, x, x, mask=other, plan=plan),
                 lambda: ringattn.ring_attention(x, x, x, mask=mask, window_size=(2, 0)),
                 lambda: sp.prepare(x.shape, mask=mask, cu_seqlens=torch.tensor([0, 16], dtype=torch.int32)),
                 lambda: sp.prepare(x.shape, mask=RangeMask.causal(32))):
        try:
            call()
            errors.append(None)
        except ValueError as e:
            errors.append(str(e))
    return errors


def test_unclear_combinations_are_refused():
    errors = run_distributed(_refusals, 2, timeout=120)[0]
    for got, want in zip(errors, ("pass causal=False", "not given to prepare",
                                  "window_size cannot be combined", "not both",
                                  "built for a sequence of 32 tokens")):
        assert got is not None and want in got, (got, want)


# --- the recipe: a shared-prompt task trains the same at sp=2 as on one process ---------

@pytest.mark.slow
def test_recipe_shared_prompt_task_sp2_equals_sp1(tmp_path):
    from tests.train_launch import (assert_losses_close, assert_weights_close, final_weights,
                                    metrics, train_ok)

    run = ["data=shared_prompt", "data.seq_len=32", "data.responses=3", "trainer.max_steps=4",
           "trainer.save_every=4", "trainer.seed=3"]
    train_ok(tmp_path / "sp1", 1, run)
    train_ok(tmp_path / "sp2", 2, run + ["parallel.sp_size=2", "parallel.layout=doc_zigzag"])
    ref, got = metrics(tmp_path / "sp1"), metrics(tmp_path / "sp2")
    assert sorted(ref) == [1, 2, 3, 4]
    assert_losses_close(ref, got, [1, 2, 3, 4])
    assert_weights_close(final_weights(tmp_path / "sp1"), final_weights(tmp_path / "sp2"))


def test_shared_prompt_samples_need_the_prompt():
    """Every response's answer is the prompt's needle, and the mask hides other responses."""
    from recipes.data import DataConfig, Kind, SharedPromptTask

    task = SharedPromptTask(DataConfig(kind=Kind.shared_prompt, seq_len=64, responses=4,
                                       passkey_digits=2), seed=0)
    tokens, labels, mask = task.sample(5)
    assert mask.seqlen == 64 and len(mask.slices) == 1 + 2 * 4
    needle = int((tokens[:32] == ord("#")).nonzero()[0])
    key = tokens[needle + 1:needle + 3]
    answers = labels[labels != -100].view(4, 2)
    assert (answers == key).all()
    seen = mask.dense(torch.arange(64), torch.arange(64))
    starts = (tokens[32:] == ord("?")).nonzero().flatten() + 32
    assert not seen[starts[1], starts[0]] and seen[starts[1], needle]


def test_attention_mass_and_decode_with_range_masks():
    """Diagnostics take the model's RangeMask (exact against a dense float64 softmax, hidden
    queries have no mass); decode attention refuses one, saying where it belongs."""
    mask = RangeMask([(0, 6), (6, 10), (12, 16)], [(0, 6), (0, 3), (6, 16)],
                     ["causal", "full", "causal"])  # queries 10, 11 see nothing
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 16, 2, 8, generator=gen), torch.randn(1, 16, 2, 8, generator=gen)
    queries, spans = [15, 4, 10, 7], [(0, 3), (3, 6), (6, 16)]
    m = ringattn.attention_mass(q, k, torch.arange(16), queries, spans=spans, causal=False,
                                mask=mask)
    s = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) / 8 ** 0.5
    s = s.masked_fill(~dense_of(mask), float("-inf"))[:, :, queries]
    p = torch.softmax(s, -1).nan_to_num(0.0)
    want = torch.stack([p[..., a:b].sum(-1) for a, b in spans], -1)
    assert (m.span_mass - want).abs().max() <= 1e-9  # float64 both ways
    assert m.span_mass[:, :, 2].abs().max() == 0  # query 10 is hidden
    with pytest.raises(ValueError, match="whole rule; pass causal=False"):
        ringattn.attention_mass(q, k, torch.arange(16), queries, mask=mask)
    with pytest.raises(ValueError, match="decode_attention takes no mask"):
        ringattn.decode_attention(q[:, :1], k, k, mask=mask)


def test_ring_skips_empty_blocks_and_stops_early():
    """Planned without communication (an AttentionPlan built directly for rank r of 4)."""
    from ringattn.plan import AttentionPlan

    def steps(mask, layout, rank):
        plan = AttentionPlan("ring", layout, 1, mask.seqlen // 4, ring_size=4, ring_rank=rank)
        return plan.ring_steps(False, mask=mask)

    chunks = RangeMask.chunked(32, 8)  # each chunk is one contiguous shard: no step but the first
    assert all(len(steps(chunks, "contiguous", r)) == 1 for r in range(4))
    # the longest need sets the ring length (rank 3 needs rank 1's keys of document [12, 32)),
    # and blocks nobody sees are skipped (rank 0 needs nothing from ranks 3 and 2)
    docs = RangeMask.documents(torch.tensor([0, 12, 32]))
    assert {len(steps(docs, "contiguous", r)) for r in range(4)} == {3}
    assert steps(docs, "contiguous", 0)[1:] == [[], []] and steps(docs, "contiguous", 3)[2] != []
    # rows 8..23 hidden: rank 1 and 2 of contiguous have nothing to compute
    hidden = RangeMask([(0, 8), (24, 32)], [(0, 32), (0, 4)], ["causal", "full"])
    assert all(tasks == [] for r in (1, 2) for tasks in steps(hidden, "contiguous", r))
