"""Capacity planner: the longest context that fits, per strategy, ZeRO stage and activation offload.

    python -m recipes.capacity model=llama3_8b trainer.dtype=bf16 world_size=8 device_gib=80
    python -m recipes.capacity model=llama3_8b trainer.dtype=bf16 world_size=64 device_gib=80 host_gib_per_node=2048
    python -m recipes.capacity model.dim=256 model.n_layers=4 model.n_heads=4 model.vocab_size=32000 \\
        model.activation_checkpointing=true world_size=2 device_gib=8 device=cpu

One sequence over the whole world (sp = world_size, dp = 1, one sequence per micro-batch),
the training recipe's model options as given (``model.tiled_loss``, ``model.tiled_mlp``,
``model.offload_activations``, ``model.activation_checkpointing``). For each strategy the
world can run (ring; all-gather, whose backward holds the whole sequence's K/V and its fp32
gradients for one layer; Ulysses when the kv heads split over the world; hybrid with Ulysses over
``gpus_per_node`` ranks inside a node and the ring across), each ZeRO stage and activation
offload off/on (on needs checkpointing and a CUDA device) it finds the longest seq_len whose
per-rank device memory (``recipes.estimate``: every term listed) fits ``device_gib`` x
``usable_fraction`` and whose host memory per node (offloaded activations + ZeRO-Offload
states) fits ``host_gib_per_node``. It prints the table, then the per-rank breakdown of the best
configuration, each term explained. Projections, not measurements: the memory model is checked
against measured peaks on CPU (tests/test_capacity.py); GPU allocator fragmentation is what
``usable_fraction`` leaves room for.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

import ringattn
from recipes import estimate, train

from recipes.estimate import GiB


@dataclass
class CapacityConfig(train.JobConfig):
    """The training job's config groups (model, trainer.dtype, deepspeed offload) plus:"""

    world_size: int = 8
    gpus_per_node: int = 8
    # memory of one device, GiB (2**30 bytes; an "80 GB" A100 has 80 GiB = 81,920 MiB)
    device_gib: float = 80.0
    usable_fraction: float = 0.9  # of device memory the run may use (allocator, CUDA context, ...)
    host_gib_per_node: float = 2048.0  # host memory of one node, GiB (a DGX H100 node has 2 TiB)
    device: str = "cuda"  # cuda | cpu (on CPU nothing is offloaded: host memory is the device)


_schema = OmegaConf.structured(CapacityConfig)
_schema.model = MISSING
ConfigStore.instance().store(name="capacity_schema", node=_schema)


def strategies(world: int, gpus_per_node: int, kv_heads: int, heads: int) -> list[tuple[str, int]]:
    """(strategy, ulysses size) the world can run one sequence with."""
    out = [("ring", 1)]
    if world > 1:
        out.append(("allgather", 1))
    if world > 1 and heads % world == 0 and kv_heads % world == 0:
        out.append(("ulysses", world))
    u = min(gpus_per_node, world)
    if 1 < u < world and world % u == 0 and heads % u == 0 and kv_heads % u == 0:
        out.append(("hybrid", u))
    return out


def capacity_rows(cfg: CapacityConfig, model) -> list[dict]:
    """One row per (strategy, ZeRO stage, offload): the longest seq_len and its estimate."""
    shape, world = model.shape, cfg.world_size
    heads, kv_heads = model.heads
    mixers = model.mixer_memory(cfg.trainer.dtype, world)  # hybrids: measured once
    rows = []
    for strategy, u in strategies(world, cfg.gpus_per_node, kv_heads, heads):
        layout = "zigzag"
        div = ringattn.layout_divisor(layout, world)
        for stage in range(4):
            for offload in (False, True):
                opts = dataclasses.replace(estimate.options_of(model, cfg.device), offload=offload)
                if offload and not opts.offloaded:
                    continue  # needs checkpointing and a CUDA device

                def est(seq_len, stage=stage, opts=opts, u=u, strategy=strategy):
                    return estimate.estimate(shape, cfg.trainer.dtype, stage,
                                             cfg.deepspeed.offload_optimizer and stage >= 1,
                                             cfg.deepspeed.offload_param and stage == 3,
                                             world_size=world, sp_size=world, micro=1, seq_len=seq_len,
                                             options=opts, ulysses_size=u, strategy=strategy, mixers=mixers)

                def fits(seq_len):
                    e = est(seq_len)
                    host = e.offloaded * min(cfg.gpus_per_node, world)
                    return e.total <= cfg.device_gib * GiB * cfg.usable_fraction and host <= cfg.host_gib_per_node * GiB

                best = estimate.max_seq_len(fits, 1 << 16, div)
                rows.append({"strategy": strategy, "ulysses_size": u, "zero_stage": stage, "offload": offload,
                             "max_seq_len": best, "estimate": est(best) if best else None})
    return rows


def report(cfg: CapacityConfig, rows: list[dict]) -> str:
    lines = [f"longest sequence per strategy x ZeRO stage x activation offload: world {cfg.world_size} "
             f"(sp = world, one sequence), {cfg.device_gib:g} GiB per device x {cfg.usable_fraction:g} usable, "
             f"host {cfg.host_gib_per_node:g} GiB per node ({cfg.gpus_per_node} devices), {cfg.trainer.dtype} "
             "-- projections from the memory model (recipes/estimate.py)",
             f"  {'strategy':<14}{'ZeRO':>5}{'offload':>9}{'max seq_len':>14}{'per rank':>11}{'device GiB':>11}"
             f"{'host GiB/node':>14}"]
    for r in rows:
        e = r["estimate"]
        name = r["strategy"] + (f" u{r['ulysses_size']}" if r["strategy"] == "hybrid" else "")
        dev = f"{e.total / GiB:11.1f}" if e else f"{'-':>11}"
        host = f"{e.offloaded * min(cfg.gpus_per_node, cfg.world_size) / GiB:14.1f}" if e else f"{'-':>14}"
        lines.append(f"  {name:<14}{r['zero_stage']:>5}{'yes' if r['offload'] else 'no':>9}{r['max_seq_len']:>14,}"
                     f"{r['max_seq_len'] // cfg.world_size:>11,}{dev}{host}")
    best = max(rows, key=lambda r: r["max_seq_len"])
    if best["estimate"] is not None:
        e = best["estimate"]
        lines.append(f"best: {best['max_seq_len']:,} tokens ({best['strategy']}, ZeRO {best['zero_stage']}, offload "
                     f"{'on' if best['offload'] else 'off'}); per rank ({e.local_tokens:,} local tokens):")
        lines += [f"  {'parameters':<24}{e.params / GiB:9.2f} GiB",
                  f"  {'gradients':<24}{e.grads / GiB:9.2f} GiB",
                  f"  {'optimizer states':<24}{e.optimizer / GiB:9.2f} GiB"]
        lines += [f"  {name:<24}{v / GiB:9.2f} GiB  {why}" for name, v, why in e.terms]
        lines.append(f"  {'total (device)':<24}{e.total / GiB:9.2f} GiB; host (offloaded) {e.offloaded / GiB:.2f} GiB per rank")
    return "\n".join(lines)


@hydra.main(config_path="../conf", config_name="capacity", version_base=None)
def main(cfg) -> None:
    job: CapacityConfig = OmegaConf.to_object(cfg)
    if job.world_size < 1 or job.gpus_per_node < 1 or job.device_gib <= 0 or not 0 < job.usable_fraction <= 1:
        raise ValueError("world_size and gpus_per_node must be >= 1, device_gib > 0, 0 < usable_fraction <= 1")
    if job.device not in ("cuda", "cpu"):
        raise ValueError(f"device={job.device!r}: expected cuda or cpu")
    _, model = train.resolve_model(job)
    print(report(job, capacity_rows(job, model)), flush=True)


if __name__ == "__main__":
    main()
