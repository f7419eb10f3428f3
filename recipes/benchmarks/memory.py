"""Memory benchmark: the recipe's real training step at increasing sequence length.

    python -m recipes.benchmarks.memory                                         # sp = 1
    torchrun --standalone --nproc-per-node 2 -m recipes.benchmarks.memory      # sp = 2
    torchrun --standalone --nproc-per-node 4 -m recipes.benchmarks.memory seqlens=[4096,8192,12288]

The whole world is one sequence-parallel group (dp = 1). For each ``seqlens`` entry (ascending)
it runs one training step of the recipe -- the model and DeepSpeed engine built as
``recipes.train`` builds them from the same ``model=``, ``parallel.``, ``deepspeed.``,
``trainer.dtype`` options, one sequence of random tokens, forward with labels (the tiled
loss unless ``model.tiled_loss=false``), backward, optimizer step -- after one warm-up step
at the first length (the optimizer states then exist). Per rank it records the peak tensor
memory of the step (``recipes.memory.PeakMemory``: the CUDA allocator's peak, or on CPU every
live tensor counted; parameters, gradients and optimizer states included) and the process's
resident-set high-water mark. It reports the max over ranks, the marginal memory per token of
sequence (the slope between the two longest lengths: pick them with every rank's tokens at
least a loss tile, ~2K tokens at vocab 32K, since a tile is min(local tokens, its size)) and
the longest sequence projected to fit in ``budget_gib`` per rank from that line; and the planner's estimate of the same peak
(``recipes.capacity``) beside it. Memory, not time, is measured: a shared CPU is fine.
"""
from __future__ import annotations

import dataclasses
import json
import resource
from dataclasses import dataclass, field
from pathlib import Path

import hydra
import torch
import torch.distributed as dist
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

from recipes import distributed, engine as engine_lib, estimate, train
from recipes.data import IGNORE_INDEX
from recipes.memory import PeakMemory

GiB = 2**30


@dataclass
class MemoryBenchmarkConfig(train.JobConfig):
    """The training job's config groups (model, parallel, deepspeed, trainer.dtype, ...) plus:"""

    seqlens: list[int] = field(default_factory=lambda: [2048, 4096, 8192])
    budget_gib: float = 8.0  # per-rank memory the longest-sequence projection fits into
    output: str = "bench_results/memory_p${oc.env:WORLD_SIZE,1}.json"


_schema = OmegaConf.structured(MemoryBenchmarkConfig)
_schema.model = MISSING  # typed by the chosen conf/model option (as in recipes.train)
ConfigStore.instance().store(name="benchmark_memory_schema", node=_schema)


def _fit(xs, ys):
    """Least-squares line y = a + b x -> (a, b)."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    var = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var if var else 0.0
    return my - b * mx, b


def _max_over_ranks(values, device):
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def run(cfg: MemoryBenchmarkConfig) -> dict:
    world = distributed.env_world_size()
    job = dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, sp_size=world),
                              data=dataclasses.replace(cfg.data, global_batch_size=1, micro_batch_size=1,
                                                       eval_batch_size=1))
    if sorted(job.seqlens) != list(job.seqlens) or len(job.seqlens) < 2:
        raise ValueError(f"seqlens={list(job.seqlens)}: give at least two lengths, ascending")
    _, model = train.resolve_model(job)
    for seq_len in job.seqlens:  # every length passes the recipe's own checks first
        train.batch_sizes(dataclasses.replace(job, data=dataclasses.replace(job.data, seq_len=seq_len)), world, model)
    ctx = distributed.init(job.parallel)
    torch.manual_seed(job.trainer.seed)
    vocab = model.shape.vocab_size
    rows = []
    mixers = model.mixer_memory(job.trainer.dtype, world)  # measured before the step's count starts
    with PeakMemory(ctx.device) as mem:  # entered before the model exists: everything is counted
        ds_config = engine_lib.deepspeed_config(job.deepspeed, job.optim, job.trainer.dtype, 1, 1, world)
        engine = engine_lib.build(model.build(ctx.sp, ctx.device, ds_config), ds_config, job.optim, 10)

        def step(seq_len):
            g = torch.Generator().manual_seed(seq_len)
            tokens = torch.randint(0, vocab, (1, seq_len), generator=g)
            labels = torch.roll(tokens, -1, 1)
            labels[:, -1] = IGNORE_INDEX
            x, y = (ctx.sp.shard(t.to(ctx.device)) for t in (tokens, labels))
            loss = engine(x, ctx.sp.positions(seq_len, device=ctx.device), None, labels=y).loss_sum
            engine.backward(loss * world / (seq_len - 1), scale_wrt_gas=False)  # as recipes.train scales it
            engine.step()

        step(job.seqlens[0])  # warm-up: optimizer states and gradients allocated
        for seq_len in job.seqlens:
            mem.reset_peak()
            static = mem.live_bytes
            step(seq_len)
            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            peak, static, rss = _max_over_ranks([mem.peak_so_far, static, rss], ctx.device)
            est = estimate.estimate(model.shape, job.trainer.dtype, job.deepspeed.zero_stage,
                                    job.deepspeed.offload_optimizer, job.deepspeed.offload_param,
                                    world_size=world, sp_size=world, micro=1, seq_len=seq_len,
                                    options=estimate.options_of(model, ctx.device.type),
                                    ulysses_size=job.parallel.ulysses_size,
                                    strategy=job.parallel.resolved_strategy, mixers=mixers)
            rows.append({"seq_len": seq_len, "peak_bytes": peak, "static_bytes": static, "rss_bytes": rss,
                         "estimate_bytes": est.total})
            if ctx.is_logger:
                print(f"sp {world} seq_len {seq_len:>7}: peak {peak / 2**20:9.1f} MiB per rank (static "
                      f"{static / 2**20:.1f}), RSS high-water {rss / 2**20:9.1f} MiB, planner "
                      f"{est.total / 2**20:9.1f} MiB", flush=True)
    # marginal: between the two longest lengths (constant-size tiles are full there; a loss tile is
    # min(local tokens, its size), so shorter lengths would add the tile's growth to the slope)
    xs = [r["seq_len"] for r in rows[-2:]]
    a, b = _fit(xs, [r["peak_bytes"] for r in rows[-2:]])
    _, b_rss = _fit(xs, [r["rss_bytes"] for r in rows[-2:]])
    summary = {"sp": world, "marginal_bytes_per_token": b, "marginal_rss_bytes_per_token": b_rss,
               "intercept_bytes": a, "budget_gib": job.budget_gib,
               "projected_max_seq_len": int((job.budget_gib * GiB - a) / b) if b > 0 else None}
    if ctx.is_logger:
        print(f"sp {world}: marginal memory per token of sequence per rank {b / 1e3:.2f} KB (tensors), "
              f"{b_rss / 1e3:.2f} KB (RSS); longest sequence in {job.budget_gib:g} GiB per rank (projected from "
              f"the measured line): {summary['projected_max_seq_len']}", flush=True)
        out = Path(job.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        meta = {"config": OmegaConf.to_container(OmegaConf.structured(cfg)) if not OmegaConf.is_config(cfg)
                else OmegaConf.to_container(cfg), "device": str(ctx.device), "torch": torch.__version__}
        out.write_text(json.dumps({"meta": meta, "rows": rows, "summary": summary}, indent=2, default=str))
        print(f"wrote {out}", flush=True)
    return {"rows": rows, "summary": summary}


@hydra.main(config_path="../../conf", config_name="benchmarks/memory", version_base=None)
def main(cfg) -> None:
    try:
        run(OmegaConf.to_object(cfg))
    finally:
        distributed.shutdown()


if __name__ == "__main__":
    main()
