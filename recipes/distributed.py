"""Processes and groups for the recipes: the process group, then ringattn's device mesh.

World = dp x sp. The groups come from ``ringattn.init_mesh`` (the one place process groups
are built): an SP group is ``sp`` consecutive ranks (one node's fast links on GPUs), Ulysses
ranks consecutive inside it. Backend: gloo on CPU, nccl on GPU. One process without a
launcher works too (a world of one).
"""
from __future__ import annotations

import datetime
import gc
import os
import time
import warnings
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from omegaconf import OmegaConf
from torch.distributed.device_mesh import DeviceMesh

import ringattn
from ringattn.inputs import check_ulysses_heads
from recipes.choices import KernelName, Layout, Strategy, at_least


@dataclass
class ParallelConfig:
    sp_size: int = 1  # ranks that share one sequence; dp = world / sp
    # ring | ulysses | hybrid | allgather (as in ringattn.SequenceParallel), or null: follows
    # from ulysses_size. Named: ring and allgather (K/V gathered once per layer) need
    # ulysses_size=1, ulysses sets ulysses_size=sp_size when it is left at 1, hybrid needs
    # 1 < ulysses_size < sp_size.
    strategy: Optional[Strategy] = None
    # all-to-all (Ulysses) degree inside the SP group: 1 = ring, sp_size = Ulysses, in
    # between = hybrid (Ulysses inside, ring across)
    ulysses_size: int = 1
    layout: Layout = Layout.zigzag  # any ringattn layout (ringattn/layouts.py); doc_zigzag: packed text
    # Seconds a collective (and the initial rendezvous) may wait for a peer before this rank
    # gives up with an error naming the failure: a dead or hung rank then ends the job
    # instead of hanging it. Keep it above the slowest step and checkpoint save.
    collective_timeout_s: float = 600.0
    # attention kernel: auto (the GPU's row of ringattn/kernels/choice.py's table, docs/kernels.md)
    # or a backend by name (fa3, flash_attn, torch_varlen, sdpa, math); one that cannot run the
    # model's dtype/head_dim on this device fails at start-up, naming what it lacks
    backend: KernelName = KernelName.auto
    # opt in to torch's FA3 (Hopper) / FA4 (Blackwell) flash implementations under auto: routes
    # torch's flash op there (torch.nn.attention.activate_flash_attention_impl, a prototype)
    torch_flash_impl: bool = False

    def __post_init__(self):
        at_least("parallel.sp_size", self.sp_size)
        at_least("parallel.ulysses_size", self.ulysses_size)
        if self.strategy == "ulysses" and self.ulysses_size == 1:
            self.ulysses_size = self.sp_size
        if self.sp_size % self.ulysses_size:
            raise ValueError(f"parallel.ulysses_size={self.ulysses_size} does not divide "
                             f"parallel.sp_size={self.sp_size}")
        derived = self.resolved_strategy
        if self.strategy == "allgather" and self.ulysses_size != 1:
            raise ValueError(f"parallel.strategy=allgather gathers K/V instead of an all-to-all: "
                             f"it needs parallel.ulysses_size=1 (got {self.ulysses_size})")
        if self.strategy is not None and self.strategy != derived:
            raise ValueError(f"parallel.strategy={self.strategy} does not match parallel.ulysses_size="
                             f"{self.ulysses_size} with parallel.sp_size={self.sp_size} (that is {derived}; "
                             "ring: ulysses_size=1, ulysses: ulysses_size=sp_size, hybrid: in between)")
        if self.collective_timeout_s <= 0:
            raise ValueError(f"parallel.collective_timeout_s={self.collective_timeout_s}: must be > 0")

    @property
    def resolved_strategy(self) -> str:
        """The strategy this config runs: ``strategy`` where named, else what ``ulysses_size``
        says. Computed, never stored back into ``strategy``: Hydra builds the config from its
        defaults first, and a stored "ring" would then contradict ``parallel.ulysses_size=2``."""
        if self.strategy == "allgather":
            return "allgather"
        return ("ring" if self.ulysses_size == 1 else
                "ulysses" if self.ulysses_size == self.sp_size else "hybrid")


def validate(cfg: ParallelConfig, world_size: int) -> None:
    """The check that needs the world size; run before any process-group work."""
    if world_size % cfg.sp_size:
        raise ValueError(
            f"parallel.sp_size={cfg.sp_size} does not divide the world size {world_size} "
            "(world = dp x sp)"
        )


def validate_heads(cfg: ParallelConfig, heads: tuple) -> None:
    """The library's Ulysses head check, before any process-group work; the error names the field."""
    if cfg.ulysses_size > 1:
        try:
            check_ulysses_heads(*heads, cfg.ulysses_size)
        except ValueError as e:
            raise ValueError(f"parallel.ulysses_size={cfg.ulysses_size}: {e}") from None


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


@dataclass
class Context:
    """One rank's view of the job: who it is, its device, the mesh and the attention front door."""

    rank: int
    world_size: int
    device: torch.device
    mesh: DeviceMesh  # from ringattn.init_mesh: dims ("dp", "ring", "ulysses"), "sp" flattened
    sp: ringattn.SequenceParallel

    @property
    def is_logger(self) -> bool:  # the one rank that writes shared files and logs
        return self.rank == 0

    @property
    def dp_rank(self) -> int:
        return self.mesh["dp"].get_local_rank()

    @property
    def dp_size(self) -> int:
        return self.mesh["dp"].size()

    @property
    def dp_group(self):
        return self.mesh["dp"].get_group()


def _elastic_store(timeout: datetime.timedelta) -> dict:
    """Under torchrun, one key space per restart attempt.

    A torchrun restart hands the new workers the same store (MASTER_ADDR:MASTER_PORT, hosted by
    the agent) without a per-attempt prefix, so gloo's connectFullMesh reads the dead attempt's
    addresses and fails with "Connection refused" (seen with torch 2.13): --max-restarts would
    never recover. Same store, as torch.distributed's env:// would open it, under a prefix.
    """
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if attempt is None:
        return {}
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    agent_hosts = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == str(True)
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                          is_master=not agent_hosts and rank == 0, timeout=timeout, multi_tenant=True)
    return {"store": dist.PrefixStore(f"ringattn/attempt_{attempt}", store), "rank": rank, "world_size": world}


# NCCL's watchdog thread handles a collective that outlives its timeout according to
# TORCH_NCCL_ASYNC_ERROR_HANDLING. Torch's default (3) and torchrun's (its agent sets 1) tear
# the process down from that thread: the main thread never sees an exception, so
# ``comm_failure``'s message naming parallel.collective_timeout_s would never print. 2
# ("clean up only") aborts the communicators and keeps the process: the failed collective
# raises DistBackendError in the main thread (at its wait or the next collective), which the
# recipe reports and exits on, so torchrun --max-restarts still restarts the job.
NCCL_ERROR_HANDLING = "2"


def nccl_error_handling(environ=os.environ) -> Optional[str]:
    """Set TORCH_NCCL_ASYNC_ERROR_HANDLING in ``environ`` (read when the NCCL group is
    created) -> a note if it replaced torchrun's value, else None.

    A value the user chose is kept, with a warning: only torchrun's 1 (its agent puts 1 into
    every rank's environment when the variable is unset: under torchrun a 1 is taken as its
    default) and an unset variable are replaced."""
    before = environ.get("TORCH_NCCL_ASYNC_ERROR_HANDLING")
    torchruns = before == "1" and "TORCHELASTIC_RUN_ID" in environ
    if before not in (None, NCCL_ERROR_HANDLING) and not torchruns:
        warnings.warn(
            f"TORCH_NCCL_ASYNC_ERROR_HANDLING={before} is set: kept. A collective that outlives "
            "parallel.collective_timeout_s then ends this process from NCCL's watchdog thread, so "
            "the message naming the failed rank and the timeout needs "
            f"TORCH_NCCL_ASYNC_ERROR_HANDLING={NCCL_ERROR_HANDLING} (or the variable unset).", stacklevel=2)
        return None
    environ["TORCH_NCCL_ASYNC_ERROR_HANDLING"] = NCCL_ERROR_HANDLING
    if before is None or before == NCCL_ERROR_HANDLING:
        return None
    return (f"TORCH_NCCL_ASYNC_ERROR_HANDLING={before} (torchrun's) -> {NCCL_ERROR_HANDLING}: a "
            "collective timeout now raises in the main thread (reported with "
            "parallel.collective_timeout_s) instead of the watchdog tearing the process down")


def init_world(timeout: datetime.timedelta) -> torch.device:
    """The default process group (gloo on CPU, nccl on GPU) and this rank's device."""
    if torch.cuda.is_available():
        backend = "nccl"
        note = nccl_error_handling()
        if note and os.environ.get("RANK", "0") == "0":
            print(note, flush=True)
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        backend, device = "gloo", torch.device("cpu")
        # DeepSpeed's public way to pick its CPU accelerator (no DS_ACCELERATOR env var needed)
        from deepspeed.accelerator import set_accelerator
        from deepspeed.accelerator.cpu_accelerator import CPU_Accelerator

        set_accelerator(CPU_Accelerator())
    store = {}
    if "RANK" not in os.environ:  # one process, no launcher: a world of one, an in-memory store (no port)
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
        store = {"store": dist.HashStore(), "rank": 0, "world_size": 1}
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, device_id=device if backend == "nccl" else None, timeout=timeout,
                                **(store or _elastic_store(timeout)))
    return device


def init(cfg: ParallelConfig) -> Context:
    """The process group, the (dp, ring, ulysses) mesh and ``SequenceParallel`` on it. Every group
    gets ``collective_timeout_s`` (the mesh's groups do not inherit init_process_group's)."""
    timeout = datetime.timedelta(seconds=cfg.collective_timeout_s)
    device = init_world(timeout)
    world = dist.get_world_size()
    validate(cfg, world)
    mesh = ringattn.init_mesh(sp=cfg.sp_size, ulysses=cfg.ulysses_size, device_type=device.type, timeout=timeout)
    sp = ringattn.SequenceParallel(cfg.resolved_strategy, cfg.layout.value, mesh=mesh,
                                   backend=cfg.backend.value)
    return Context(dist.get_rank(), world, device, mesh, sp)


def broadcast_object(obj, src: int = 0):
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


_COMM_ERROR_HINTS = ("gloo", "nccl", "connection closed", "connection reset", "timed out", "broken pipe")


def comm_failure(exc: BaseException, cfg: ParallelConfig) -> Optional[str]:
    """A clear one-line report if ``exc`` is a failed collective (a peer died or hung), else None.
    Gloo raises plain RuntimeErrors ("Connection closed by peer", "Timed out waiting"); NCCL and
    the rendezvous store raise torch.distributed.DistError (NCCL's watchdog timeout reaches the
    main thread as a DistBackendError only with ``nccl_error_handling``'s setting)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return None
    text = str(exc).strip()
    if not (isinstance(exc, dist.DistError) or
            (isinstance(exc, RuntimeError) and any(h in text.lower() for h in _COMM_ERROR_HINTS))):
        return None
    first = text.splitlines()[0] if text else type(exc).__name__
    return (f"rank {dist.get_rank()} of {dist.get_world_size()}: a collective failed -- another rank died or "
            f"did not answer within parallel.collective_timeout_s={cfg.collective_timeout_s:g}s "
            f"({type(exc).__name__}: {first}). Stopping this rank; under torchrun --max-restarts the job "
            "restarts from the latest checkpoint.")


def barrier() -> None:
    """Wait for every rank (nothing to wait for without a process group or with one rank)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
    # Free the process groups' objects now, while the runtime is whole: the model, the engine
    # and the device mesh hold them in reference cycles, which interpreter teardown would
    # otherwise free after C++ statics are gone (seen: an occasional "terminate called
    # without an active exception" abort at exit, after a successful run).
    gc.collect()


def run_id() -> str:
    """The run dir's name (``${run_id:}`` in conf/train.yaml and conf/eval_needle.yaml):
    torchrun's run id, the same on every rank and across restarts, else the start time. "none" is torchrun's default --rdzv-id (a
    static rendezvous, accelerate launch): not an id -- every such job would share outputs/none."""
    rid = os.environ.get("TORCHELASTIC_RUN_ID", "")
    return rid if rid and rid != "none" else time.strftime("%Y-%m-%d_%H-%M-%S")


# ``${run_id:}`` in conf/*.yaml (registered on import, before Hydra composes the config)
OmegaConf.register_new_resolver("run_id", run_id, replace=True)


def agree_on_run_dir(run_dir: str) -> str:
    """Rank 0's run dir for every rank: ranks of launchers without a shared id resolve the start
    time each for themselves, seconds apart. A rank that resolved another dir drops it if empty."""
    agreed = broadcast_object(run_dir)
    if agreed != run_dir:
        try:
            os.rmdir(run_dir)  # made by Hydra for this rank alone; only ever removed when empty
        except OSError:
            pass
    return agreed
