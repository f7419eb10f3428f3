"""Ulysses and hybrid Ulysses x ring attention, and DP x SP meshes, on real process groups.

Same method and fp32 tolerance as ``test_ring_attention``: every rank builds the same full
float64 inputs from one seed, runs the front door on its shard (forward and
``out.backward(dout)``), and compares its shard of out, lse, dq, dk, dv with the float64
single-process reference. The tokens a rank holds are restated independently here
(``_held``), so a sharding bug cannot hide behind itself.
"""
from __future__ import annotations

import itertools

import pytest
import torch
import torch.distributed as dist

import ringattn
from tests.distributed import run_distributed
from tests.test_documents_windows import _case, cu_of
from tests.reference import layout_indices, reference_attention, rel_err, rms_err
from tests.test_ring_attention import FP32_TOL, LAYOUTS, _inputs, _single_device_rms

HEADS = ((8, 8), (8, 2), (8, 1))  # MHA, GQA 8->2, kv_heads < u (and 8->2 < u=4)
# uneven head counts, sinks and softcap: tests/test_sinks_softcap_heads.py


def _held(strategy, layout, seqlen, world, rank, ulysses_size):
    """Hybrid: the layout over the ring positions, each shard cut contiguously in u."""
    if strategy != "hybrid":
        return layout_indices(layout, seqlen, world, rank)
    ring_shard = layout_indices(layout, seqlen, world // ulysses_size, rank // ulysses_size)
    return ring_shard.chunk(ulysses_size)[rank % ulysses_size]


def _errors(sp, cfg, seed=0, dtype=torch.float32, err=rel_err):
    """Run one configuration through ``sp``; return {tensor name: error of this shard}."""
    layout, causal, (heads, kv_heads), batch, head_dim, local_len = cfg
    inputs = _inputs(seed, batch, local_len * sp.world_size, heads, kv_heads, head_dim)
    ref = reference_attention(*inputs, causal=causal)
    return _shard_errors(sp, inputs, ref, dtype, err, causal=causal)


def _shard_errors(sp, inputs, ref, dtype=torch.float32, err=rel_err, **attention_kwargs):
    """This rank's shard of full float64 ``inputs`` through ``sp`` vs. the reference's."""
    q, k, v, dout = inputs
    batch, seqlen, heads, _ = q.shape
    idx = _held(sp.strategy, sp.layout, seqlen, sp.world_size, sp.rank, sp.ulysses_size)
    ql, kl, vl = (t[:, idx].to(dtype).requires_grad_() for t in (q, k, v))
    out, lse = sp.attention(ql, kl, vl, return_lse=True, **attention_kwargs)
    out.backward(dout[:, idx].to(dtype))
    assert out.dtype == dtype and lse.dtype == torch.float32 and kl.grad.dtype == dtype
    assert out.shape == ql.shape and lse.shape == (batch, heads, len(idx))
    ref_out, ref_lse, ref_dq, ref_dk, ref_dv = ref
    return {
        "out": err(out, ref_out[:, idx]), "lse": rel_err(lse, ref_lse[:, :, idx]),
        "dq": err(ql.grad, ref_dq[:, idx]), "dk": err(kl.grad, ref_dk[:, idx]),
        "dv": err(vl.grad, ref_dv[:, idx]),
    }


def _front_doors(world):
    """Every strategy this world size offers, as (name, SequenceParallel) per layout."""
    doors = {}
    for layout in LAYOUTS:
        doors[("ring", layout)] = ringattn.SequenceParallel("ring", layout=layout)
        doors[("ulysses", layout)] = ringattn.SequenceParallel("ulysses", layout=layout)
        if world == 4:  # 2 x 2: once from a mesh, once split from a plain group
            mesh = ringattn.init_mesh(sp=4, ulysses=2)
            doors[("hybrid-mesh", layout)] = ringattn.SequenceParallel("hybrid", layout, mesh=mesh)
            doors[("hybrid-group", layout)] = ringattn.SequenceParallel("hybrid", layout, ring_size=2)
        else:  # 1 x 2: a ring of one inside, Ulysses over both
            doors[("hybrid", layout)] = ringattn.SequenceParallel("hybrid", layout, ulysses_size=2)
    return doors


def _matrix(rank, world):
    failures = []
    for (name, layout), sp in _front_doors(world).items():
        assert sp.world_size == world and sp.rank == rank
        for causal, heads in itertools.product((False, True), HEADS):
            cfg = (layout, causal, heads, 2, 32, 8)
            errs = _errors(sp, cfg)
            bad = {n: e for n, e in errs.items() if not e <= FP32_TOL}
            if bad:
                failures.append((name, cfg, bad))
    return failures


def test_world2_ring_ulysses_hybrid_match_reference():
    for rank, failures in enumerate(run_distributed(_matrix, 2, timeout=300)):
        assert not failures, f"rank {rank}: {len(failures)} configs beyond {FP32_TOL}: {failures[:5]}"


@pytest.mark.slow  # 4 ranks; the quick tier runs the strategies at 2 (hybrid 1 x 2)
def test_world4_ring_ulysses_hybrid_2x2_match_reference():
    for rank, failures in enumerate(run_distributed(_matrix, 4, timeout=300)):
        assert not failures, f"rank {rank}: {len(failures)} configs beyond {FP32_TOL}: {failures[:5]}"


def _bf16(rank, world, cfgs):
    doors = [ringattn.SequenceParallel("ulysses", "zigzag"),
             ringattn.SequenceParallel("hybrid", "zigzag", ulysses_size=2)]
    return [[_errors(sp, cfg, dtype=torch.bfloat16, err=rms_err) for cfg in cfgs] for sp in doors]


@pytest.mark.slow  # 4 ranks; the quick tier keeps the 2x2 hybrid matrix
def test_bf16_ulysses_and_hybrid_within_2x_single_device_error():
    # Same criterion as the ring's: RMS error over the whole sequence <= 2x that of
    # single-device fused SDPA in bf16 (a per-step bf16 rounding would exceed it).
    cfgs = [("zigzag", causal, (8, 2), 2, 64, 64) for causal in (False, True)]
    per_rank = run_distributed(_bf16, 4, cfgs, timeout=300)
    for door, name in enumerate(("ulysses", "hybrid 2x2")):
        for i, cfg in enumerate(cfgs):
            single = _single_device_rms(cfg, torch.bfloat16)
            for t, base in single.items():
                got = (sum(r[door][i][t] ** 2 for r in per_rank) / 4) ** 0.5
                assert got <= 2 * base, f"{name} {cfg} {t}: rms {got:.3g} > 2x single-device {base:.3g}"


def _documents_windows(rank, world):
    """Packed documents and sliding windows through Ulysses and hybrid 2x2 (world 4)."""
    doors = [ringattn.SequenceParallel(strategy, layout, ulysses_size=2 if strategy == "hybrid" else None)
             for strategy in ("ulysses", "hybrid") for layout in ("zigzag", "striped")]
    docs = [5, 27, 1, 31]  # 64 tokens
    failures = []
    for window, causal, use_docs in (((-1, -1), True, True), ((5, -1), True, True),
                                     ((3, 2), False, True), ((4, 4), False, False)):
        inputs, ref = _case(0, docs, window, causal, use_docs, (8, 2))
        for sp in doors:
            errs = _shard_errors(sp, inputs, ref, causal=causal, window_size=window,
                                 cu_seqlens=cu_of(docs) if use_docs else None)
            if not max(errs.values()) <= FP32_TOL:
                failures.append((repr(sp), window, causal, use_docs, errs))
    return failures


@pytest.mark.slow  # 4 ranks; the quick tier keeps the 2x2 hybrid matrix
def test_documents_and_windows_under_ulysses_and_hybrid():
    for rank, failures in enumerate(run_distributed(_documents_windows, 4, timeout=300)):
        assert not failures, f"rank {rank}: {failures[:3]}"


def _dp_sp(rank, world):
    """dp=2 x sp=2: replica d holds sequence seed 100+d and attends only inside its SP group."""
    mesh = ringattn.init_mesh(dp=2, sp=2)
    hybrid_mesh = ringattn.init_mesh(dp=2, sp=2, ulysses=2)
    replica = mesh["dp"].get_local_rank()
    assert replica == rank // 2
    doors = [ringattn.SequenceParallel("ring", "zigzag", mesh=mesh),
             ringattn.SequenceParallel("ulysses", "striped", mesh=mesh),
             ringattn.SequenceParallel("hybrid", "zigzag", mesh=hybrid_mesh),
             ringattn.SequenceParallel("ulysses", "zigzag", mesh=hybrid_mesh["ring", "ulysses"])]
    results = []
    for sp in doors:
        assert sp.world_size == 2 and sp.rank == rank % 2
        cfg = (sp.layout, True, (8, 2), 1, 32, 8)
        results.append((repr(sp), _errors(sp, cfg, seed=100 + replica)))
    return results


@pytest.mark.slow  # 4 ranks; the quick tier keeps the 2x2 hybrid matrix
def test_dp2_x_sp2_mesh_each_replica_matches_its_own_reference():
    for rank, results in enumerate(run_distributed(_dp_sp, 4, timeout=180)):
        assert len(results) == 4
        for name, errs in results:
            assert max(errs.values()) <= FP32_TOL, f"rank {rank} {name}: {errs}"


def _bad_configs(rank, world):
    """Only rank 0 tries them: any communication would fail or hang without rank 1."""
    if rank != 0:
        return []
    q8, k2 = torch.randn(1, 8, 8, 16), torch.randn(1, 8, 2, 16)
    q1 = torch.randn(1, 8, 1, 16)
    cases = [
        ("unknown strategy", lambda: ringattn.SequenceParallel("all_to_all_gather")),
        ("must equal the sequence-parallel size 2", lambda: ringattn.SequenceParallel("hybrid", ring_size=3)),
        ("ulysses_size=4", lambda: ringattn.SequenceParallel("hybrid", ulysses_size=4)),
        ("needs ring_size or ulysses_size", lambda: ringattn.SequenceParallel("hybrid")),
        ("must equal the sequence-parallel", lambda: ringattn.SequenceParallel("ring", ulysses_size=2)),
        ("either group or mesh", lambda: ringattn.SequenceParallel(mesh=object(), group=dist.group.WORLD)),
        ("at least 2 query heads", lambda: ringattn.ulysses_attention(q1, q1, q1)),
        ("sinks must have shape (heads,) = (8,)",
         lambda: ringattn.ulysses_attention(q8, k2, k2, sinks=torch.zeros(2))),
        ("at least 2 query heads", lambda: ringattn.hybrid_attention(q1, q1, q1, ulysses_group=dist.group.WORLD)),
        ("multiple of 4", lambda: ringattn.ulysses_attention(q8[:, :3], k2[:, :3], k2[:, :3])),
        ("backend 'sdpa' cannot run this input: it has no logit softcapping",
         lambda: ringattn.ring_attention(q8, k2, k2, backend="sdpa", softcap=50.0)),
        ("must equal the world size (2)", lambda: ringattn.init_mesh(dp=3, sp=1)),
        ("= 4 must equal the world size", lambda: ringattn.init_mesh(dp=2, sp=2)),
        ("ulysses (3) must divide sp (2)", lambda: ringattn.init_mesh(sp=2, ulysses=3)),
    ]
    seen = []
    for want, call in cases:
        try:
            call()
        except ValueError as e:
            seen.append((want, str(e)))
        else:
            seen.append((want, None))
    return seen


def test_bad_configurations_raise_before_any_communication():
    seen, _ = run_distributed(_bad_configs, 2, timeout=60)
    assert len(seen) == 14
    for want, msg in seen:
        assert msg is not None and want in msg, (want, msg)


def _roundtrip(rank, world):
    x = torch.arange(2 * 32 * 3, dtype=torch.float64).view(2, 32, 3)
    doors = {name: sp for (name, layout), sp in _front_doors(world).items() if layout == "zigzag"}
    doors["hybrid-striped"] = ringattn.SequenceParallel("hybrid", "striped", ulysses_size=2)
    out = {}
    for name, sp in doors.items():
        want = _held(sp.strategy, sp.layout, 32, world, rank, sp.ulysses_size)
        local = sp.shard(x)
        out[name] = (torch.equal(sp.positions(32), want), torch.equal(local, x[:, want]),
                     torch.equal(sp.unshard(local), x),
                     torch.equal(sp.shard(torch.arange(32), dim=0), want))
    return out


@pytest.mark.slow  # 4 ranks; the quick tier keeps the 2x2 hybrid matrix
def test_front_door_shard_unshard_positions_roundtrip_per_strategy():
    for rank, checks in enumerate(run_distributed(_roundtrip, 4, timeout=120)):
        assert set(checks) == {"ring", "ulysses", "hybrid-mesh", "hybrid-group", "hybrid-striped"}
        for name, ok in checks.items():
            assert all(ok), f"rank {rank} {name}: positions/shard/unshard/shard(dim=0) = {ok}"
