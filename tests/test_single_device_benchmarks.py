"""Single-device benchmarks for the GPU checks (recipes/benchmarks/virtual_ring.py, recipes/benchmarks/kernels.py).

The virtual ring times the ring's exact block schedule in one process; this checks that what it
times is the real computation: every virtual rank's out and dq, reassembled by the layout, equal
the float64 reference. The kernel benchmark reports each fused kernel or why it cannot run."""
import math

import pytest
import torch

from recipes.benchmarks.virtual_ring import VirtualRingConfig, measure, virtual_rank
from ringattn.kernels import get_backend
from ringattn.layouts import get_layout
from tests.reference import layout_indices, reference_attention


@pytest.mark.parametrize("layout", ["zigzag", "striped", "contiguous"])
@pytest.mark.parametrize("world", [1, 2, 4])
def test_virtual_ring_schedule_is_exact(layout, world):
    gen = torch.Generator().manual_seed(world)
    s, h, kvh, d = 64, 4, 2, 16
    q, k, v = (torch.randn(1, s, n, d, generator=gen) for n in (h, kvh, kvh))
    ref = reference_attention(q, k, v, torch.ones(1, s, h, d, dtype=torch.float64), causal=True)
    lay, kernel = get_layout(layout), get_backend("auto", q)
    out, dq = torch.empty(1, s, h, d), torch.empty(1, s, h, d)
    for r in range(world):
        idx = layout_indices(layout, s, world, r)  # independent of ringattn.layouts
        out[:, idx], dq[:, idx] = virtual_rank(kernel, lay, r, world, q, k, v, 1 / math.sqrt(d))()
    # fp32 kernels against float64: 1e-5 absolute is ~100x the fp32 rounding seen here
    torch.testing.assert_close(out.double(), ref[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(dq.double(), ref[2], atol=1e-5, rtol=0)


def test_measure_reports_each_world_and_skips_indivisible():
    cfg = VirtualRingConfig(seqlens=[48], worlds=[2, 5], heads=2, kv_heads=2, head_dim=8, warmup=0, iters=1)
    rows = measure(cfg, torch.device("cpu"))
    assert [r["P"] for r in rows] == [2, 5]
    assert rows[0]["efficiency"] > 0 and rows[0]["overhead"] > 0
    assert "multiple of 10" in rows[1]["skipped"]


def test_kernel_benchmark_times_what_runs_and_names_what_cannot():
    from recipes.benchmarks.kernels import KernelBenchConfig, measure as measure_kernels

    cfg = KernelBenchConfig(seqlens=[64], dtypes=["fp32"], head_dims=[16], heads=2, warmup=1, iters=1,
                            math_max_seqlen=32)
    rows = {r["kernel"]: r for r in measure_kernels(cfg, torch.device("cpu"))}
    assert rows["flash"]["ms"] > 0  # the CPU flash kernel runs fp32
    assert "math_max_seqlen" in rows["math"]["skipped"]
    if not torch.cuda.is_available():
        assert isinstance(rows["efficient"]["skipped"], str)  # CUDA-only kernels say why not
    from omegaconf import OmegaConf, ValidationError

    with pytest.raises(ValidationError, match="Invalid value 'fastest', expected one of"):
        OmegaConf.merge(OmegaConf.structured(KernelBenchConfig), {"kernels": ["fastest"]})


def test_attention_benchmark_range_mask_batches(tmp_path):
    """range_mask= builds the RangeMask on the whole sequence, runs it in the parallel path and
    the one-process baseline, and reports its computed balance; nonsense combinations are refused."""
    from omegaconf import OmegaConf, ValidationError

    from recipes import distributed
    from recipes.benchmarks.attention import BenchmarkConfig, RangeMaskKind, _range_mask, run
    from recipes.choices import Layout, Strategy
    from ringattn import RangeMask, balance

    shared, prefix_lm = RangeMaskKind.shared_prefix, RangeMaskKind.prefix_lm
    for clash, over in (("causal=true", dict(causal=True)), ("window", dict(window=[8, 0])),
                        ("doc_lengths", dict(doc_lengths=[100, 156])),
                        ("docs_lognormal_mean", dict(docs_lognormal_mean=64))):
        with pytest.raises(ValueError, match=f"range_mask=shared_prefix is the whole attention rule; drop {clash}"):
            BenchmarkConfig(range_mask=shared, **over)
    with pytest.raises(ValidationError, match="Invalid value 'causal', expected one of"):
        OmegaConf.merge(OmegaConf.structured(BenchmarkConfig), {"range_mask": "causal"})
    assert BenchmarkConfig().causal is True and BenchmarkConfig(range_mask=shared).causal is False

    cfg = BenchmarkConfig(range_mask=shared, prompt_len=64, response_lens=[100, 92])
    assert _range_mask(cfg, 256) == RangeMask.shared_prefix(64, [100, 92])
    with pytest.raises(ValueError, match="response_lens sum to 192, not 200"):
        _range_mask(cfg, 264)
    # prefix_lm: the prefix is capped at each (here drawn) document
    cfg = BenchmarkConfig(range_mask=prefix_lm, prompt_len=40, mask_mean_len=48, docs_seed=3)
    cu = balance.lognormal_documents(256, mean=48, seed=3)
    assert _range_mask(cfg, 256) == RangeMask.prefix_lm(cu, cu.diff().clamp(max=40))

    s, h = 256, 2
    cfg = BenchmarkConfig(seqlens=[s], heads=h, kv_heads=h, head_dim=16, range_mask=shared, prompt_len=64,
                          mask_mean_len=48, strategies=[Strategy.ring], layouts=[Layout.doc_zigzag],
                          warmup=0, iters=1, output=str(tmp_path / "out.json"))
    try:
        (row,) = run(cfg)  # one process: the library's local path on both sides
    finally:
        distributed.shutdown()
    mask = _range_mask(cfg, s)
    assert row["mask_balance"] == balance.imbalance(balance.mask_work(mask, "doc_zigzag", 1)) == 1.0
    # the scores computed are exactly the mask's visible pairs (a dense s x s run would skip 0 %)
    visible = int(balance.mask_work(mask, "doc_zigzag", 1).sum()) * h
    assert row["mask_skipped"] == pytest.approx(1 - visible / (h * s * s), abs=1e-12)
    assert row["mask_skipped"] > 0.3 and row["efficiency_fwd_bwd"] > 0
