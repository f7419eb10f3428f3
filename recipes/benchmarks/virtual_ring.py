"""Blockwise efficiency on one device: the ring's exact block schedule, communication left out.

    python -m recipes.benchmarks.virtual_ring                                # CPU, small
    python -m recipes.benchmarks.virtual_ring seqlens=[32768,131072] worlds=[2,4,8] \
        heads=32 kv_heads=8 head_dim=128 dtype=bf16                          # one GPU

For each simulated ring size P and layout, every virtual rank r runs what ring attention
runs on rank r: the layout's block tasks for each of the P ring steps (``Layout.block_tasks``,
as ``AttentionPlan.ring_steps`` uses them), each kernel call merged into fp32 accumulators (``PartialAttention``),
then the backward's per-block gradients from the final out/lse with fp32 dQ/dK/dV
accumulation (``accumulate_grads``). Only the K/V transfer is left out. Each virtual rank is
timed on its own, forward + backward, and compared with one fused call on the whole
sequence (``monolithic``):

    efficiency = monolithic / (P * slowest virtual rank)   the ring's compute critical path
    overhead   = sum over ranks / monolithic                block split + merge cost

1.0 efficiency means cutting the sequence into P shards and merging costs nothing and the
work is perfectly balanced. The anchor is ring-flash-attention's 90.2 % for zigzag on
8 x H800 (with communication); communication overlap is what ``recipes.benchmarks.attention``
measures with real ranks.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import hydra
import torch
from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from recipes.benchmarks.results import report, single_device
from recipes.choices import AttnDtype, Layout
from ringattn.blocks import accumulate_grads, attend_blocks
from ringattn.kernels import get_backend
from ringattn.kernels.base import accumulation_dtype
from ringattn.layouts import get_layout
from ringattn.merge import PartialAttention


@dataclass
class VirtualRingConfig:
    seqlens: list[int] = field(default_factory=lambda: [4096])
    worlds: list[int] = field(default_factory=lambda: [2, 4, 8])
    layouts: list[Layout] = field(default_factory=lambda: [Layout.zigzag])
    heads: int = 8
    kv_heads: int = 8
    head_dim: int = 64
    dtype: AttnDtype = AttnDtype.fp32
    backend: str = "auto"
    warmup: int = 1
    iters: int = 3
    output: str = "bench_results/virtual_ring.json"

    def __post_init__(self):
        for p in self.worlds:
            if p < 1:
                raise ValueError(f"worlds: ring sizes must be >= 1; got {p}")


ConfigStore.instance().store(name="benchmark_virtual_ring_schema", node=VirtualRingConfig)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, cfg, device) -> float:
    """Mean seconds per call after ``warmup`` calls."""
    for _ in range(cfg.warmup):
        fn()
    _sync(device)
    start = time.perf_counter()
    for _ in range(cfg.iters):
        fn()
    _sync(device)
    return (time.perf_counter() - start) / cfg.iters


def monolithic(kernel, q, k, v, scale):
    """One fused causal call on the whole sequence, forward + backward."""
    out, lse = kernel.forward(q, k, v, causal=True, scale=scale)
    kernel.backward(torch.ones_like(out), q, k, v, out, lse, causal=True, scale=scale)


def virtual_rank(kernel, layout, rank, world, q, k, v, scale):
    """Rank ``rank``'s forward and backward of a P-rank causal ring, in one process: a
    function returning this rank's (out, dq) for dout = 1 (tests check them exact).

    q/k/v are the whole (b, s, h, d) tensors; the shards are gathered by the layout's
    indices once, outside the timed region (they stand for what the ring delivers).
    """
    local = q.shape[1] // world
    acc_dtype = accumulation_dtype(q.dtype)
    acc = PartialAttention(q[:, :local], acc_dtype)
    steps = [(src, layout.block_tasks(rank, src, world, local, True))
             for src in ((rank - i) % world for i in range(world))]
    q_r = q[:, layout.indices(q.shape[1], world, rank)].contiguous()
    kv = {src: (k[:, idx].contiguous(), v[:, idx].contiguous())
          for src, idx in ((s, layout.indices(q.shape[1], world, s)) for s, _ in steps)}

    def run():
        acc.out.zero_()
        acc.lse.fill_(float("-inf"))
        for src, tasks in steps:
            attend_blocks(kernel, tasks, q_r, *kv[src], scale, acc)
        out, lse = acc.out.to(q.dtype), acc.lse
        dout = torch.ones_like(out)
        dq = torch.zeros(q_r.shape, dtype=acc_dtype, device=q.device)
        for src, tasks in steps:
            k_s, v_s = kv[src]
            dk = torch.zeros(k_s.shape, dtype=acc_dtype, device=q.device)
            dv = torch.zeros_like(dk)
            accumulate_grads(kernel, tasks, dout, q_r, k_s, v_s, out, lse, scale, dq, dk, dv)
        return out, dq

    return run


def measure(cfg: VirtualRingConfig, device: torch.device) -> list[dict]:
    dtype = AttnDtype(cfg.dtype).torch
    rows = []
    for seqlen in cfg.seqlens:
        gen = torch.Generator().manual_seed(0)
        q = torch.randn(1, seqlen, cfg.heads, cfg.head_dim, generator=gen).to(device, dtype)
        k = torch.randn(1, seqlen, cfg.kv_heads, cfg.head_dim, generator=gen).to(device, dtype)
        v = torch.randn(1, seqlen, cfg.kv_heads, cfg.head_dim, generator=gen).to(device, dtype)
        kernel = get_backend(cfg.backend, q)
        scale = 1.0 / math.sqrt(cfg.head_dim)
        t_mono = _timed(lambda: monolithic(kernel, q, k, v, scale), cfg, device)
        for layout_name in map(str, cfg.layouts):
            layout = get_layout(layout_name)
            for world in cfg.worlds:
                if seqlen % layout.divisor(world):
                    rows.append({"seqlen": seqlen, "layout": layout_name, "P": world,
                                 "skipped": f"seqlen not a multiple of {layout.divisor(world)}"})
                    continue
                per_rank = [_timed(virtual_rank(kernel, layout, r, world, q, k, v, scale), cfg, device)
                            for r in range(world)]
                rows.append({
                    "seqlen": seqlen, "layout": layout_name, "P": world, "kernel": kernel.name,
                    "dtype": str(cfg.dtype), "monolithic_ms": 1e3 * t_mono,
                    "slowest_rank_ms": 1e3 * max(per_rank), "sum_ranks_ms": 1e3 * sum(per_rank),
                    "efficiency": t_mono / (world * max(per_rank)),
                    "overhead": sum(per_rank) / t_mono,
                })
    return rows


def table(rows: list[dict]) -> str:
    head = "| seqlen | layout | P | kernel | monolithic ms | slowest rank ms | sum ms | efficiency | overhead |"
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['seqlen']} | {r['layout']} | {r['P']} | skipped: {r['skipped']} | | | | | |")
            continue
        lines.append(f"| {r['seqlen']} | {r['layout']} | {r['P']} | {r['kernel']} {r['dtype']} | "
                     f"{r['monolithic_ms']:.1f} | {r['slowest_rank_ms']:.1f} | {r['sum_ranks_ms']:.1f} | "
                     f"**{r['efficiency']:.3f}** | {r['overhead']:.3f} |")
    return "\n".join(lines)


@hydra.main(config_path="../../conf", config_name="benchmarks/virtual_ring", version_base=None)
def main(cfg) -> None:
    cfg: VirtualRingConfig = OmegaConf.to_object(cfg)
    device = single_device()
    rows = measure(cfg, device)
    report(rows, table(rows), cfg.output, device)


if __name__ == "__main__":
    main()
