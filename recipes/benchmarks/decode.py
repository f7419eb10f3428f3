"""Decode benchmark: generation over a KV cache sharded across P ranks (ringattn.models.generate).

    python -m recipes.benchmarks.decode                                        # P = 1
    torchrun --standalone --nproc-per-node 2 -m recipes.benchmarks.decode      # P = 2

A randomly initialised Llama (``dim``, ``n_layers``, ``n_heads``, ``n_kv_heads``) prefills a
prompt of ``cache`` tokens over the P ranks (ring attention, ``layout``), then decodes
``tokens`` greedy steps. Reported: prefill time, decode latency per token (median over the
steps, max over ranks), the KV-cache bytes each rank holds after the prefill (max over
ranks), and, measured with ``ringattn.profile``, the decode collectives' bytes per token
and the share of a step spent in them. Each rank uses ``threads_per_rank`` threads, so P
ranks stand for P devices (on a machine with fewer cores than ranks the timings measure
oversubscription, not the algorithm). Prints one row; JSON to ``output``.
"""
from __future__ import annotations

import datetime
import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import hydra
import torch
import torch.distributed as dist
from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

import ringattn
from ringattn import profile
from ringattn.models import Llama, LlamaConfig
from ringattn.models.generation import KVCache, decode_step, prefill
from recipes import distributed
from recipes.choices import Layout


@dataclass
class DecodeBenchmarkConfig:
    cache: int = 8192  # prompt tokens = total KV-cache length at the first decode step
    tokens: int = 16  # decode steps timed
    batch: int = 1
    dim: int = 512
    n_layers: int = 2
    n_heads: int = 8
    n_kv_heads: int = 8
    vocab_size: int = 256
    layout: Layout = Layout.zigzag
    threads_per_rank: int = 1
    output: str = "bench_results/decode_p${oc.env:WORLD_SIZE,1}.json"
    collective_timeout_s: float = 600.0


ConfigStore.instance().store(name="benchmark_decode_schema", node=DecodeBenchmarkConfig)


def _max(x: float, device) -> float:
    t = torch.tensor([x], dtype=torch.float64, device=device if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def run(cfg: DecodeBenchmarkConfig) -> dict:
    device = distributed.init_world(datetime.timedelta(seconds=cfg.collective_timeout_s))
    torch.set_num_threads(cfg.threads_per_rank)
    p = dist.get_world_size()
    sp = ringattn.SequenceParallel("ring", layout=str(cfg.layout))
    torch.manual_seed(0)
    mcfg = LlamaConfig(dim=cfg.dim, n_layers=cfg.n_layers, n_heads=cfg.n_heads, n_kv_heads=cfg.n_kv_heads,
                       vocab_size=cfg.vocab_size)
    model = Llama(mcfg, sp).to(device).eval()
    prompt = torch.randint(0, cfg.vocab_size, (cfg.batch, cfg.cache), generator=torch.Generator().manual_seed(0))
    prompt = prompt.to(device)
    cache = KVCache(mcfg.n_layers, p, sp.rank)
    dist.barrier()
    t0 = time.perf_counter()
    logits = prefill(model, prompt, cache)
    _sync(device)
    prefill_s = _max(time.perf_counter() - t0, device)
    kv_bytes = _max(cache.nbytes(), device)
    steps = []
    with profile.RingProfile() as prof:  # bytes and collective waits of the decode steps
        for i in range(cfg.tokens):
            nxt = logits.argmax(-1, keepdim=True)
            t0 = time.perf_counter()
            logits = decode_step(model, nxt, cfg.cache + i, cache)
            _sync(device)
            steps.append(time.perf_counter() - t0)
    decode_s = _max(statistics.median(steps), device)
    sent = prof.bytes_sent // cfg.tokens  # measured: two all-reduces per layer, fp32
    wait = _max(prof.wait_s / sum(steps), device)
    row = {"world": p, "cache": cfg.cache, "layout": str(cfg.layout), "prefill_s": prefill_s,
           "decode_ms_per_token": decode_s * 1e3, "kv_cache_mib_per_rank": kv_bytes / 2**20,
           "decode_allreduce_bytes_per_token": sent, "decode_wait_share": wait,
           "config": OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)}
    if dist.get_rank() == 0:
        print(f"P={p} cache={cfg.cache}: prefill {prefill_s:.2f} s, decode {decode_s * 1e3:.1f} ms/token, "
              f"KV cache {kv_bytes / 2**20:.1f} MiB/rank, all-reduce {sent} B/token "
              f"({wait:.0%} of a step waiting)", flush=True)
        Path(cfg.output).parent.mkdir(parents=True, exist_ok=True)
        Path(cfg.output).write_text(json.dumps(row, indent=1))
    return row


@hydra.main(config_path="../../conf", config_name="benchmarks/decode", version_base="1.3")
def main(cfg: DecodeBenchmarkConfig) -> None:
    try:
        run(cfg)
    finally:
        distributed.shutdown()


if __name__ == "__main__":
    main()
