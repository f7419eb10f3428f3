"""Process groups for the recipe: world = dp x sp.

Ranks are laid out on a (dp, sp) grid with sp innermost: rank = dp_index * sp + sp_index, so
an SP group is ``sp`` consecutive ranks (one node's fast links on GPUs). Backend: gloo on
CPU, nccl on GPU. One process without a launcher works too (a world of one).
"""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

import ringattn


@dataclass
class ParallelConfig:
    sp_size: int = 1  # ranks that share one sequence; dp = world / sp
    # all-to-all (Ulysses) degree inside the SP group; the strategy follows from it:
    # 1 = ring, sp_size = Ulysses, in between = hybrid (Ulysses inside, ring across)
    ulysses_size: int = 1
    layout: str = "zigzag"  # zigzag | striped | contiguous

    @property
    def strategy(self) -> str:
        if self.ulysses_size == 1:
            return "ring"
        return "ulysses" if self.ulysses_size == self.sp_size else "hybrid"


LAYOUTS = ("zigzag", "striped", "contiguous")


def validate(cfg: ParallelConfig, world_size: int) -> None:
    """Checks that need only the world size; run before any process-group work."""
    if cfg.layout not in LAYOUTS:
        raise ValueError(f"parallel.layout={cfg.layout!r}: expected one of {LAYOUTS}")
    if cfg.sp_size < 1 or world_size % cfg.sp_size:
        raise ValueError(
            f"parallel.sp_size={cfg.sp_size} does not divide the world size {world_size} "
            "(world = dp x sp)"
        )
    if cfg.ulysses_size < 1 or cfg.sp_size % cfg.ulysses_size:
        raise ValueError(f"parallel.ulysses_size={cfg.ulysses_size} does not divide parallel.sp_size={cfg.sp_size}")


def validate_heads(cfg: ParallelConfig, n_heads: int, kv_heads: int) -> None:
    u = cfg.ulysses_size
    if u > 1 and (n_heads % u or (kv_heads % u and u % kv_heads)):
        raise ValueError(f"parallel.ulysses_size={u} needs heads ({n_heads}) divisible by it and kv heads "
                         f"({kv_heads}) dividing it or a multiple of it")


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Mesh:
    rank: int
    world_size: int
    dp_rank: int
    dp_size: int
    sp_rank: int
    sp_size: int
    sp_group: object
    dp_group: object
    device: torch.device
    sp: ringattn.SequenceParallel

    @property
    def is_logger(self) -> bool:  # the one rank that writes shared files and logs
        return self.rank == 0


def init(cfg: ParallelConfig) -> Mesh:
    if torch.cuda.is_available():
        backend = "nccl"
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        backend, device = "gloo", torch.device("cpu")
        # DeepSpeed's public way to pick its CPU accelerator (no DS_ACCELERATOR env var needed)
        from deepspeed.accelerator import set_accelerator
        from deepspeed.accelerator.cpu_accelerator import CPU_Accelerator

        set_accelerator(CPU_Accelerator())
    if "RANK" not in os.environ:  # one process, no launcher: a world of one
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(_free_port()))
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, device_id=device if backend == "nccl" else None)
    world, rank = dist.get_world_size(), dist.get_rank()
    validate(cfg, world)
    sp_size = cfg.sp_size
    dp_size = world // sp_size
    sp_group = dp_group = None
    for d in range(dp_size):  # every rank must create every group, in the same order
        g = dist.new_group([d * sp_size + i for i in range(sp_size)])
        if rank // sp_size == d:
            sp_group = g
    for i in range(sp_size):
        g = dist.new_group([d * sp_size + i for d in range(dp_size)])
        if rank % sp_size == i:
            dp_group = g
    sp = ringattn.SequenceParallel(strategy=cfg.strategy, layout=cfg.layout, group=sp_group,
                                   ulysses_size=cfg.ulysses_size if cfg.strategy == "hybrid" else None)
    return Mesh(rank, world, rank // sp_size, dp_size, rank % sp_size, sp_size, sp_group, dp_group, device, sp)


def broadcast_object(obj, src: int = 0):
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
