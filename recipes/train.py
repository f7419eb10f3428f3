"""Long-context training with sequence parallelism on DeepSpeed.

    python -m recipes.train model=tiny trainer.max_steps=20                 # one process
    torchrun --standalone --nproc-per-node 2 -m recipes.train parallel.sp_size=2
    deepspeed --num_gpus 8 -m recipes.train model=llama3_8b parallel.sp_size=8 trainer.dtype=bf16

Composes: typed config (Hydra, conf/) -> process groups -> data -> model -> DeepSpeed engine
-> checkpoints and metrics. Each part owns its config dataclass; JobConfig only groups them.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import signal
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, List, Optional

import hydra
import torch
import torch.distributed as dist
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from omegaconf import MISSING, OmegaConf

import ringattn
from ringattn.kernels import choice as kernel_choice, get_backend
from ringattn.models import LlamaConfig
from recipes import checkpoint, data, distributed, engine as engine_lib, estimate, models, tracking
from recipes.choices import Dtype, at_least
from recipes.data import IGNORE_INDEX, DataConfig
from recipes.distributed import ParallelConfig
from recipes.engine import DeepSpeedConfig, OptimConfig
from recipes.tracking import LoggerConfig

log = logging.getLogger("recipes.train")


@dataclass
class TrainerConfig:
    max_steps: int = 600
    seed: int = 0
    log_every: int = 10
    eval_every: int = 100  # 0: only at the end
    save_every: int = 0  # 0: no periodic checkpoints; else every K steps and at the end
    # Complete checkpoints kept, newest first (0: all). Keep 2 or more: a resume falls back to the
    # previous one if the newest turns out truncated or corrupt.
    keep_checkpoints: int = 2
    # Signals that make every rank finish its optimizer step, save a checkpoint (whatever
    # save_every) and exit with status 128 + the signal's number (docs/preemption.md). SLURM
    # sends SIGTERM on preemption and the --signal=USR1@N of launch/slurm.sbatch before the time
    # limit. []: the signals keep their default action (the process ends, unsaved).
    save_on_signal: List[str] = field(default_factory=lambda: ["SIGTERM", "SIGUSR1"])
    dtype: Dtype = Dtype.fp32
    # Stop this invocation after this step (e.g. to fit a job time limit), with a checkpoint at
    # that step whatever save_every; the LR schedule still spans max_steps and rerunning the
    # command with the same hydra.run.dir resumes. null: run to max_steps.
    stop_at_step: Optional[int] = None
    # Peak dense TFLOP/s of one GPU for the MFU estimate; None: looked up for known GPUs (bf16).
    # MFU = model FLOPs per step (recipes/flops.py: backward = 2x forward, PaLM/torchtitan) / step time / peak
    peak_tflops: Optional[float] = None
    # Validate the config and parallel layout, print a memory estimate per rank, train nothing.
    dry_run: bool = False
    # World size the dry run plans for; None: the launcher's WORLD_SIZE (1 without a launcher)
    dry_run_world_size: Optional[int] = None
    # torch.compile the model (DeepSpeed's engine.compile(): Dynamo + Inductor; the attention
    # autograd Functions run eagerly between compiled graphs). The first step compiles.
    compile: bool = False

    def __post_init__(self):
        at_least("trainer.max_steps", self.max_steps)
        at_least("trainer.log_every", self.log_every)
        at_least("trainer.eval_every", self.eval_every, minimum=0)
        at_least("trainer.save_every", self.save_every, minimum=0)
        at_least("trainer.keep_checkpoints", self.keep_checkpoints, minimum=0)
        at_least("trainer.stop_at_step", self.stop_at_step, allow_none=True)
        at_least("trainer.dry_run_world_size", self.dry_run_world_size, allow_none=True)
        if self.peak_tflops is not None and self.peak_tflops <= 0:
            raise ValueError(f"trainer.peak_tflops={self.peak_tflops}: must be > 0 (or null: looked up)")
        for name in self.save_on_signal:
            if name not in _CATCHABLE:
                raise ValueError(f"trainer.save_on_signal: {name!r} is not a signal this process can catch; "
                                 f"expected names such as {', '.join(_CATCHABLE[:6])}")


_CATCHABLE = [s.name for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGINT, signal.SIGHUP,
                               signal.SIGQUIT, signal.SIGCONT)]


@dataclass
class JobConfig:
    model: Any = field(default_factory=LlamaConfig)  # or models.HFModelConfig (model=hf)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)


_schema = OmegaConf.structured(JobConfig)
_schema.model = MISSING  # typed by the chosen conf/model option, which names its schema (recipes/models.py)
ConfigStore.instance().store(name="job_schema", node=_schema)


@dataclass
class BatchSizes:
    """The batch arithmetic derived from the config (never configured)."""

    dp: int
    micro: int  # sequences per forward on one rank
    grad_accum: int


def batch_sizes(job: JobConfig, world_size: int, model) -> BatchSizes:
    """Every check that needs no process group: bad input fails here, before any work.
    ``model``: the resolved model object (``recipes.models.resolve``)."""
    distributed.validate(job.parallel, world_size)
    distributed.validate_heads(job.parallel, model.heads)
    d = job.data
    div = ringattn.layout_divisor(job.parallel.layout.value, job.parallel.sp_size)
    if d.seq_len % div:
        raise ValueError(f"data.seq_len={d.seq_len} cannot be split by layout '{job.parallel.layout}' over "
                         f"sp_size={job.parallel.sp_size} ranks: it must be a multiple of {div}")
    dp = world_size // job.parallel.sp_size
    if d.global_batch_size % dp:
        raise ValueError(f"data.global_batch_size={d.global_batch_size} is not divisible by dp={dp} "
                         f"(world {world_size} / sp {job.parallel.sp_size})")
    per_rank = d.global_batch_size // dp
    packed_docs = (d.kind == data.Kind.text and d.document_masking) or d.kind == data.Kind.shared_prompt
    micro = d.micro_batch_size or (1 if packed_docs else per_rank)
    if ringattn.layout_needs_documents(job.parallel.layout.value) and not packed_docs:
        raise ValueError(f"parallel.layout={job.parallel.layout.value} places tokens by document: it needs packed "
                         "documents (data=text with data.document_masking=true)")
    if packed_docs and micro != 1:
        raise ValueError(f"data.document_masking (and data=shared_prompt) needs data.micro_batch_size=1 "
                         f"(got {micro}): attention takes the documents (the mask) of one packed "
                         "sequence at a time")
    if per_rank % micro:
        raise ValueError(f"data.micro_batch_size={micro} does not divide the {per_rank} sequences per "
                         f"data-parallel rank (global_batch_size {d.global_batch_size} / dp {dp})")
    if d.eval_batch_size % dp:
        raise ValueError(f"data.eval_batch_size={d.eval_batch_size} is not divisible by dp={dp}")
    return BatchSizes(dp=dp, micro=micro, grad_accum=per_rank // micro)


_PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0}


def peak_flops(t: TrainerConfig, device: torch.device) -> Optional[float]:
    if t.peak_tflops:
        return t.peak_tflops * 1e12
    if device.type != "cuda" or t.dtype != Dtype.bf16:
        return None
    name = torch.cuda.get_device_name(device)
    return next((v * 1e12 for k, v in _PEAK_BF16_TFLOPS.items() if k in name), None)


def _fmt_time(s: float) -> str:
    s = int(s)
    return f"{s // 3600}h{s // 60 % 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def _grad_norm(module) -> float:
    grads = [p.grad.float().norm() for p in module.parameters() if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack(grads)).item() if grads else 0.0


def _all_sum(*values, device):
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


@torch.no_grad()
def evaluate(engine, batches, ctx, job, positions):
    tokens, labels, _ = batches.eval_batch(job.data.eval_batch_size)
    tokens, labels = ctx.sp.shard(tokens.to(ctx.device)), ctx.sp.shard(labels.to(ctx.device))
    engine.eval()
    correct = total = 0
    for i in range(0, tokens.shape[0], batches.micro):
        lab = labels[i:i + batches.micro]
        # argmax per sequence tile inside the model: no full logits here either
        correct += engine(tokens[i:i + batches.micro], positions, labels=lab).correct.item()
        total += (lab != IGNORE_INDEX).sum().item()
    engine.train()
    correct, total = _all_sum(correct, total, device=ctx.device)
    return correct / max(total, 1)


def resolve_model(job: JobConfig):
    """The tokenizer and the one model object the recipe asks everything about the model."""
    data.check_files(job.data)
    tokenizer = data.build_tokenizer(job.data)
    return tokenizer, models.resolve(job.model, tokenizer)


class StopSignals:
    """Save on a signal. The handler only records the first signal; the ranks agree on it inside
    the all-reduce every step makes anyway (one slot per configured signal), so a signal that
    reaches the ranks at different steps still stops them all after the same step, at no extra
    collective. Under torchrun the agent forwards the signals it handles to the workers
    (launch/ scripts add SIGUSR1 to --signals-to-handle) and SIGKILLs them after
    --shutdown-timeout, which must cover the step in flight and the save."""

    def __init__(self, names: List[str]):
        self.signals = [signal.Signals[n] for n in names]
        self.received: Optional[signal.Signals] = None
        self._previous = {}

    def _record(self, signum, frame) -> None:
        if self.received is None:
            self.received = signal.Signals(signum)

    def __enter__(self) -> "StopSignals":
        self._previous = {s: signal.signal(s, self._record) for s in self.signals}
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)

    def flags(self) -> List[float]:
        """This rank's slots for the step's all-reduce."""
        return [float(s == self.received) for s in self.signals]

    def agreed(self, sums: List[float]) -> Optional[signal.Signals]:
        """The signal every rank stops for, from the all-reduced slots (the first configured one
        any rank received), or None."""
        return next((s for s, n in zip(self.signals, sums) if n > 0), None)


def exit_status(sig: signal.Signals, watched: bool = False) -> int:
    """The status after a save on ``sig``: 128 + the signal's number (143 for SIGTERM, 138 for
    SIGUSR1), the status a process killed by it would have had, so SLURM and shells read "ended
    by the signal", never success -- but the checkpoint is complete and a rerun resumes.

    ``watched`` (a rank started by a launcher that watches its ranks: torchrun's agent, the
    DeepSpeed launcher, srun): 0. To those launchers any other status is a failure of the rank:
    torchrun restarts the workers of every node whose agent did not itself get the signal (they
    then wait in a re-rendezvous for nodes that have stopped, past the time limit), and the
    DeepSpeed launcher and ``srun --kill-on-bad-exit`` kill the other ranks, mid-save if they are
    still saving. The run dir's ``stopped.json`` says "stopped, not finished" instead, with this
    128 + N, which launch/slurm.sbatch and launch/deepspeed_hostfile.sh return as the job's status."""
    return 0 if watched else 128 + int(sig)


def launcher_watches_ranks(world_size: int) -> bool:
    """True when this rank was started by a launcher that acts on its ranks' exit status: a
    torchrun agent (TORCHELASTIC_RUN_ID, even for one rank), or any launcher of several ranks."""
    return world_size > 1 or "TORCHELASTIC_RUN_ID" in os.environ


class IntervalClock:
    """Seconds per training step over a logging interval, without the evaluation and checkpoint
    time that fell in it (``excluded()``), so tokens/s and MFU measure training alone."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter):
        self.clock = clock
        self.start, self.excluded_s, self.steps = clock(), 0.0, 0

    @contextmanager
    def excluded(self):
        t = self.clock()
        try:
            yield
        finally:
            self.excluded_s += self.clock() - t

    def step_done(self) -> None:
        self.steps += 1

    def lap(self) -> float:
        """Training seconds per step since the last lap; starts the next interval."""
        now = self.clock()
        dt = (now - self.start - self.excluded_s) / max(1, self.steps)
        self.start, self.excluded_s, self.steps = now, 0.0, 0
        return dt


@dataclass
class Run:
    """What the helpers of one training invocation share."""

    job: JobConfig
    ctx: distributed.Context
    model: Any  # recipes.models.resolve(...)
    sizes: BatchSizes
    engine: Any
    batches: data.StepBatches
    dataset: Any
    positions: Optional[torch.Tensor]  # global positions for unpacked data; packed: per sequence
    run_dir: str
    planned: Optional[data.PlannedBatches] = None  # sharded micro-batches with plans, a step ahead


@dataclass
class StepResult:
    loss: float
    lr: float
    grad_norm: Optional[float]
    stop: Optional[signal.Signals]  # a signal every rank agreed to stop for


# Model config fields (the same names in LlamaConfig and HFModelConfig) that change what is kept
# in memory or written at the end, never what the weights mean or what a step computes: a resume
# may change them -- turning on checkpointing or offload is how a run fits on fewer GPUs.
# HFModelConfig.path only supplies the initial weights, which the checkpoint replaces.
_NOT_FACTS = ("activation_checkpointing", "offload_activations", "tiled_loss", "loss_tile_tokens", "tiled_mlp",
              "mlp_tile_tokens", "save_final", "path")


def _facts(job: JobConfig, model) -> dict:
    """What a checkpoint must share with this run to be resumed: what the weights and the data
    mean (the model's options other than memory ones, its shapes, vocabulary and parameter count;
    sequence length, global batch, seed, data kind). The parallel shape and memory options need not."""
    return {"model": {k: v for k, v in dataclasses.asdict(model.cfg).items() if k not in _NOT_FACTS},
            "shape": dataclasses.asdict(model.shape), "seq_len": job.data.seq_len,
            "global_batch_size": job.data.global_batch_size, "seed": job.trainer.seed,
            "data_kind": job.data.kind.value}


def _resume(job: JobConfig, model, ctx, sizes: BatchSizes, run_dir: str):
    """Find and check the checkpoint to resume from, build the engine, load it.
    Returns (engine, start step, checkpoint path or None, how it was loaded)."""
    found = checkpoint.find_resumable(run_dir, _facts(job, model), ctx.rank, ctx.world_size)
    ckpt, meta = (found.path, found.meta) if found else (None, None)
    universal = bool(found) and checkpoint.needs_universal(ckpt, meta, ctx.world_size, job.deepspeed.zero_stage,
                                                           files=found.files)
    ds_config = engine_lib.deepspeed_config(job.deepspeed, job.optim, job.trainer.dtype, sizes.micro,
                                            sizes.grad_accum, ctx.world_size)
    if universal:
        ds_config["checkpoint"] = {"load_universal": True}
    module = model.build(ctx.sp, ctx.device, ds_config)
    engine = engine_lib.build(module, ds_config, job.optim, job.trainer.max_steps)
    if job.trainer.compile:
        engine.compile()
    if not ckpt:
        return engine, 0, None, ""
    if universal:
        checkpoint.to_universal(ckpt, ctx.rank)
    checkpoint.load(engine, ckpt, ctx.rank, universal=universal)
    how = (f"universal format: world {meta['world_size']} ZeRO-{meta['zero_stage']} -> world {ctx.world_size} "
           f"ZeRO-{job.deepspeed.zero_stage}" if universal else
           f"world {meta['world_size']} -> {ctx.world_size}" if meta["world_size"] != ctx.world_size else "")
    return engine, meta["step"], ckpt, how


def _train_step(r: Run, step: int, own_grad_norm: bool, stop: StopSignals) -> StepResult:
    """One optimizer step over this rank's micro-batches; two small all-reduces (valid tokens,
    then the loss sum together with the stop-signal slots)."""
    ctx, engine = r.ctx, r.engine
    micro_batches = r.planned.take(step - 1)  # sharded, each with its plan, built a step ahead
    local_valid = sum(int((y != IGNORE_INDEX).sum()) for _, y, _, _ in micro_batches)
    (n_valid,) = _all_sum(local_valid, device=ctx.device)  # valid tokens of the global batch
    scale = ctx.world_size / max(n_valid, 1.0)  # see the note in recipes/engine.py
    lr, loss_sum, grad_norm = engine.get_lr()[0], 0.0, None
    for i, (x, y, pos, attend) in enumerate(micro_batches):  # attend: cu_seqlens= or mask=
        s = engine(x, r.positions if pos is None else pos, labels=y, **attend).loss_sum  # token-loss sum
        engine.backward(s * scale, scale_wrt_gas=False)
        if i == len(micro_batches) - 1 and own_grad_norm:
            grad_norm = _grad_norm(engine.module)  # already reduced over the world by backward
        engine.step()
        loss_sum += s.item()
    if grad_norm is None:
        grad_norm = engine.get_global_grad_norm()
    loss_sum, *signal_sums = _all_sum(loss_sum, *stop.flags(), device=ctx.device)
    return StepResult(loss_sum / max(n_valid, 1.0), lr, None if grad_norm is None else float(grad_norm),
                      stop.agreed(signal_sums))


def _log_step(r: Run, step: int, res: StepResult, clock: IntervalClock, tracker, progress: str,
              extra: dict | None = None) -> None:
    """Metrics of a logging step (every rank: evaluation is a collective); printed and tracked
    by the logging rank, with ``extra`` (the first logged step: which kernels ran). Throughput
    covers the training time of the interval only."""
    t, d = r.job.trainer, r.job.data
    dt = clock.lap()
    metrics = {"loss": res.loss, "lr": res.lr, "grad_norm": res.grad_norm,
               "tokens_per_s": d.global_batch_size * d.seq_len / dt, "seq_len": d.seq_len, **(extra or {})}
    peak = peak_flops(t, r.ctx.device)
    if peak:
        metrics["mfu"] = r.model.shape.flops_per_step(d.global_batch_size, d.seq_len) / dt / (peak * r.ctx.world_size)
    if ((t.eval_every and step % t.eval_every == 0) or step == t.max_steps) and \
            getattr(r.dataset, "chance", None) is not None:
        with clock.excluded():
            metrics["accuracy"] = evaluate(r.engine, r.batches, r.ctx, r.job, r.positions)
        metrics["accuracy_chance"] = r.dataset.chance
    if not r.ctx.is_logger:
        return
    metrics["mem_gib"] = (torch.cuda.max_memory_allocated() if r.ctx.device.type == "cuda" else _rss()) / 2**30
    tracker.log(step, metrics)
    mfu = f" | MFU {metrics['mfu']:.1%}" if "mfu" in metrics else ""
    acc = f" | acc {metrics['accuracy']:.3f} (chance {metrics['accuracy_chance']:.2f})" if "accuracy" in metrics else ""
    print(f"step {step}/{t.max_steps} | loss {res.loss:.4f}{acc} | lr {res.lr:.2e} | "
          f"{metrics['tokens_per_s']:.0f} tok/s{mfu} | {progress}", flush=True)


def _save(r: Run, step: int) -> None:
    j = r.job
    meta = dict(_facts(j, r.model), world_size=r.ctx.world_size, dp=r.sizes.dp, sp=r.ctx.sp.world_size,
                zero_stage=j.deepspeed.zero_stage, dtype=j.trainer.dtype.value,
                samples_seen=step * j.data.global_batch_size)
    checkpoint.save(r.engine, r.run_dir, step, meta, r.ctx.rank, r.ctx.world_size, keep=j.trainer.keep_checkpoints)


def _attention_kernel(job: JobConfig, ctx, model) -> str:
    """The attention kernel this run starts with (``parallel.backend``; auto: the GPU's row of
    ringattn/kernels/choice.py), torch's FA3/FA4 activated if opted in, logged once ->
    "attention kernel: FA3 (sm90)". A named backend that cannot run the model fails here."""
    p = job.parallel
    n_heads, kv_heads = model.heads
    head_dim = model.shape.kv_dim // kv_heads
    dtype = job.trainer.dtype.torch
    if p.backend == "auto":
        picked = kernel_choice.choose_at_start(ctx.device, dtype, head_dim,
                                               torch_impls=p.torch_flash_impl)
    else:
        probe = torch.empty(1, 1, n_heads, head_dim, device=ctx.device, dtype=dtype)
        picked = kernel_choice.Candidate(get_backend(p.backend.value, probe).name)
    return kernel_choice.activate(picked, ctx.device, log_line=ctx.is_logger)


def resume_hint(run_dir: str) -> str:
    return f"rerun the same command with hydra.run.dir={run_dir} to resume"


def train(job: JobConfig, run_dir: str, resolved: dict) -> int:
    """Train to trainer.max_steps (or stop_at_step); returns the process exit status: 0, or
    ``exit_status(signal)`` after a save on a signal."""
    with StopSignals(job.trainer.save_on_signal) as stop:  # first: a signal during setup counts too
        tokenizer, model = resolve_model(job)
        sizes = batch_sizes(job, distributed.env_world_size(), model)
        ctx = distributed.init(job.parallel)
        kernel_line = _attention_kernel(job, ctx, model)
        run_dir = distributed.agree_on_run_dir(run_dir)
        torch.manual_seed(job.trainer.seed)
        dataset = data.build_dataset(job.data, job.trainer.seed, tokenizer)
        engine, start, ckpt, how = _resume(job, model, ctx, sizes, run_dir)
        batches = data.StepBatches(dataset, job.data.global_batch_size, ctx.dp_rank, sizes.dp, sizes.micro)
        positions = None if ringattn.layout_needs_documents(ctx.sp.layout) else \
            ctx.sp.positions(job.data.seq_len, device=ctx.device)
        r = Run(job, ctx, model, sizes, engine, batches, dataset, positions, run_dir,
                data.PlannedBatches(batches, ctx.sp, ctx.device, engine.module))
        tracker = tracking.NullTracker()
        if ctx.rank == 0:
            checkpoint.clear_stopped(run_dir)  # this run is not stopped (yet)
        if ctx.is_logger:
            OmegaConf.save(OmegaConf.create(resolved), os.path.join(run_dir, "config.yaml"))
            tracker = tracking.Tracker(job.logger, run_dir, resolved, resume_step=start)
            resumed = f"resumed from {ckpt} at step {start}" + (f" ({how})" if how else "")
            log.info("run dir %s | world %d = dp %d x sp %d | micro %d x accum %d | %.2fM params | %s",
                     run_dir, ctx.world_size, sizes.dp, ctx.sp.world_size, sizes.micro, sizes.grad_accum,
                     model.shape.num_params() / 1e6, resumed if ckpt else "fresh start")
        # DeepSpeed reports the gradient norm except on its plain fp32 path (stage 0, no bf16)
        own_grad_norm = not engine.zero_optimization() and not engine.bfloat16_enabled()
        watched = launcher_watches_ranks(ctx.world_size)
        t = job.trainer
        clock, t_begin, step, res = IntervalClock(), time.time(), start, None
        logged_kernels = False
        for step in range(start + 1, t.max_steps + 1):  # steps are numbered from 1
            res = _train_step(r, step, own_grad_norm, stop)
            if step == t.max_steps:
                res.stop = None  # a signal during the last step: the run is complete, finish normally
            clock.step_done()
            stopping = step == t.stop_at_step or res.stop is not None
            if stopping:
                # Save first: the scheduler's grace time is for the checkpoint, and an evaluation
                # that runs long or raises must not cost it. Evaluation and logging follow.
                if res.stop is not None and ctx.is_logger:
                    log.warning("%s received: saving a checkpoint at step %d and exiting with status %d",
                                res.stop.name, step, exit_status(res.stop, watched))
                with clock.excluded():
                    _save(r, step)
                if res.stop is not None:
                    if ctx.rank == 0:
                        checkpoint.mark_stopped(run_dir, step, res.stop.name, t.max_steps, resume_hint(run_dir),
                                                exit_status(res.stop))
                    # No rank leaves before the marker is written: a launcher that sees one rank
                    # end may stop the others (srun --kill-on-bad-exit, DeepSpeed's launcher).
                    distributed.barrier()
                if ctx.is_logger and step < t.max_steps:
                    log.info("stopped at step %d of %d: %s", step, t.max_steps, resume_hint(run_dir))
            if step % t.log_every == 0 or step == t.max_steps or (t.eval_every and step % t.eval_every == 0):
                eta = (time.time() - t_begin) / (step - start) * (t.max_steps - step)
                # the first logged row records, once, which kernel ran each block kind
                kernels = None if logged_kernels else {"attention_kernel": kernel_line,
                                                       "kernels_by_block": kernel_choice.ran()}
                _log_step(r, step, res, clock, tracker, f"ETA {_fmt_time(eta)}", kernels)
                logged_kernels = True
            if stopping:
                break
            if t.save_every and (step % t.save_every == 0 or step == t.max_steps):
                with clock.excluded():
                    _save(r, step)
        if start < t.max_steps and step == t.max_steps and (res is None or res.stop is None):
            model.save_final(engine, run_dir, ctx.rank)
        tracker.close()
        if ctx.is_logger:
            log.info("done: step %d of %d, %s in this run", step, t.max_steps, _fmt_time(time.time() - t_begin))
        return exit_status(res.stop, watched) if res is not None and res.stop is not None else 0


def dry_run(job: JobConfig) -> None:
    """Every check of a real start that needs no process group, then the memory estimate."""
    world = job.trainer.dry_run_world_size or distributed.env_world_size()
    _, model = resolve_model(job)
    p = batch_sizes(job, world, model)
    ds, par = job.deepspeed, job.parallel

    if int(os.environ.get("RANK", "0")) != 0:
        return
    mixers = model.mixer_memory(job.trainer.dtype, par.sp_size)

    def est(stage, **kw):
        return estimate.estimate(model.shape, job.trainer.dtype, stage, world_size=world, sp_size=par.sp_size,
                                 micro=p.micro, seq_len=job.data.seq_len, options=estimate.options_of(model),
                                 ulysses_size=par.ulysses_size, strategy=par.resolved_strategy, mixers=mixers, **kw)

    e = est(ds.zero_stage, offload_optimizer=ds.offload_optimizer, offload_param=ds.offload_param)
    print(estimate.report(e, world_size=world, dp=p.dp, sp_size=par.sp_size, strategy=par.resolved_strategy,
                          layout=par.layout, micro=p.micro, grad_accum=p.grad_accum, zero_stage=ds.zero_stage,
                          dtype=job.trainer.dtype), flush=True)
    stages = " | ".join(f"{z}: {est(z, offload_optimizer=False, offload_param=False).total / estimate.GiB:.2f}"
                        for z in range(4))
    print(f"  total per rank by ZeRO stage, no offload (GiB): {stages}", flush=True)


def _rss() -> int:
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    except Exception:
        return 0


@hydra.main(config_path="../conf", config_name="train", version_base=None)
def main(cfg) -> None:
    tracking.configure_logging()
    resolved = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    job: JobConfig = OmegaConf.to_object(cfg)
    if job.trainer.dry_run:
        return dry_run(job)
    run_dir = os.path.abspath(HydraConfig.get().runtime.output_dir)
    status = 0
    try:
        status = train(job, run_dir, resolved)
    except Exception as e:
        failure = distributed.comm_failure(e, job.parallel)
        if failure is None:
            raise
        # a peer is gone: report it and exit without the collective teardown, which could wait on it
        log.error("%s", failure)
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)
    finally:
        distributed.shutdown()
    if status:
        sys.exit(status)  # saved on a signal (exit_status)


def _strip_launcher_args() -> None:
    """The deepspeed launcher appends ``--local_rank=N``; Hydra takes only overrides."""
    for a in list(sys.argv[1:]):
        if a.startswith("--local_rank=") or a.startswith("--local-rank="):
            os.environ.setdefault("LOCAL_RANK", a.split("=", 1)[1])
            sys.argv.remove(a)


if __name__ == "__main__":
    _strip_launcher_args()
    sys.exit(main())
