"""Optimizer, LR schedule and the DeepSpeed engine, built from the typed config.

Every hyperparameter lives once, in OptimConfig / DeepSpeedConfig / the data config; the
DeepSpeed JSON is derived here and nowhere else.

Gradient reduction (the approach, in one place): DeepSpeed is given no ``mpu``, so it
treats *all* world = dp x sp ranks as data-parallel replicas and AVERAGES gradients over
them (every ZeRO stage divides by the world size). The SP ranks of one group hold
partial gradients of the same sequences that must be SUMMED, and DP groups hold
different sequences. So each rank's loss is its local token-loss sum divided by the
valid tokens of the whole global batch, times ``world_size`` to cancel DeepSpeed's
averaging: the reduced gradient is then exactly the gradient of (sum of all token
losses) / (valid tokens in the global batch) -- token-weighted over DP x SP x
accumulation. ``engine.backward(..., scale_wrt_gas=False)`` stops DeepSpeed dividing by
the accumulation steps a second time.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import List

import torch

from recipes.choices import Dtype


@dataclass
class OptimConfig:
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 50
    weight_decay: float = 0.0
    betas: List[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0: no clipping


@dataclass
class DeepSpeedConfig:
    zero_stage: int = 0  # 0 | 1 | 2 | 3
    offload_optimizer: bool = False  # ZeRO-Offload of optimizer states to CPU (stage >= 1)
    offload_param: bool = False  # parameters to CPU (stage 3)

    def __post_init__(self):
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"deepspeed.zero_stage={self.zero_stage}: expected 0, 1, 2 or 3")
        if self.offload_optimizer and self.zero_stage == 0:
            raise ValueError("deepspeed.offload_optimizer needs deepspeed.zero_stage >= 1")
        if self.offload_param and self.zero_stage != 3:
            raise ValueError("deepspeed.offload_param needs deepspeed.zero_stage=3")


def lr_lambda(optim: OptimConfig, max_steps: int):
    """Linear warmup to 1 over warmup_steps, then cosine to min_lr_ratio at max_steps."""

    def fn(step: int) -> float:
        if step < optim.warmup_steps:
            return (step + 1) / optim.warmup_steps
        progress = (step - optim.warmup_steps) / max(1, max_steps - optim.warmup_steps)
        cos = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return optim.min_lr_ratio + (1.0 - optim.min_lr_ratio) * cos

    return fn


def deepspeed_config(ds: DeepSpeedConfig, optim: OptimConfig, dtype: Dtype, micro: int, grad_accum: int,
                     world_size: int) -> dict:
    zero = {"stage": ds.zero_stage}
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    if ds.offload_param:
        zero["offload_param"] = {"device": "cpu"}
    return {
        # DeepSpeed counts every rank as a replica (see the module note): its "train batch"
        # is micro x accumulation x world, not our global batch in sequences.
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": micro * grad_accum * world_size,
        "gradient_clipping": optim.grad_clip,
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": optim.lr,
                "betas": list(optim.betas),
                "eps": optim.eps,
                "weight_decay": optim.weight_decay,
                # torch's AdamW unless offloading (DeepSpeedCPUAdam); no compiled ops needed
                "torch_adam": not ds.offload_optimizer,
            },
        },
        "zero_optimization": zero,
        "bf16": {"enabled": dtype == Dtype.bf16},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


def build(model: torch.nn.Module, ds_config: dict, optim: OptimConfig, max_steps: int):
    import deepspeed

    engine, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=[p for p in model.parameters() if p.requires_grad],
        config=ds_config,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(optim, max_steps)),
    )
    # Training mode from the first step: transformers' from_pretrained returns a model in eval
    # mode, where its layers skip activation checkpointing (and dropout) until set otherwise.
    engine.train()
    return engine
