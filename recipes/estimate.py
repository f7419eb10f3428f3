"""Memory estimate per rank for a dry run (``trainer.dry_run=true``): what one rank holds for
parameters, gradients and optimizer states under each ZeRO stage, and the activations of
one micro-batch of its sequence shard. Arithmetic only -- nothing is allocated.

ZeRO partitions over the whole world (dp x sp): DeepSpeed is given no ``mpu`` and treats
every rank as a replica (see recipes/engine.py). Bytes per parameter follow the ZeRO
paper: fp32 keeps 4 (param) + 4 (grad) + 8 (Adam m, v); bf16 keeps 2 + 2 + 12 (fp32
master copy, m, v). Activations are an upper-bound style estimate of the tensors saved for
backward per token and layer (norm inputs/outputs, q/k/v, attention output, SwiGLU's
three ffn-wide tensors), plus the logits with their fp32 copy for the loss and the ring's
double-buffered K/V in flight; activation checkpointing keeps one layer input per layer
plus one layer's worth during recomputation.
"""
from __future__ import annotations

from dataclasses import dataclass

GiB = 2**30


@dataclass
class MemoryEstimate:
    params: float  # bytes on the device, per rank
    grads: float
    optimizer: float
    activations: float
    offloaded: float  # bytes per rank kept in CPU memory instead (ZeRO-Offload)
    n_params: int
    local_tokens: int  # tokens of one micro-batch on one rank

    @property
    def total(self) -> float:
        return self.params + self.grads + self.optimizer + self.activations


def estimate(model, dtype: str, zero_stage: int, offload_optimizer: bool, offload_param: bool,
             world_size: int, sp_size: int, micro: int, seq_len: int,
             activation_checkpointing: bool) -> MemoryEstimate:
    """``model``: the ``recipes.models.ModelShape`` of the recipe's model object."""
    n = model.params
    b = 2 if dtype == "bf16" else 4
    opt_bytes = 12 if dtype == "bf16" else 8
    w = world_size
    params = n * b / (w if zero_stage >= 3 else 1)
    grads = n * b / (w if zero_stage >= 2 else 1)
    optimizer = n * opt_bytes / (w if zero_stage >= 1 else 1)
    offloaded = 0.0
    if offload_optimizer:
        offloaded += optimizer
        optimizer = 0.0
    if offload_param:
        offloaded += params
        params = 0.0

    tokens = micro * seq_len // sp_size
    kv, ffn = model.kv_dim, model.ffn_dim
    per_layer_token = (7 * model.dim + 3 * kv + 4 * ffn) * b
    if activation_checkpointing:
        layers = model.n_layers * model.dim * b * tokens + per_layer_token * tokens
    else:
        layers = model.n_layers * per_layer_token * tokens
    logits = tokens * model.vocab_size * (b + 4)
    ring_buffers = 2 * 2 * kv * tokens * b if sp_size > 1 else 0
    return MemoryEstimate(params, grads, optimizer, layers + logits + ring_buffers, offloaded, n, tokens)


def report(est: MemoryEstimate, *, world_size: int, dp: int, sp_size: int, strategy: str, layout: str,
           micro: int, grad_accum: int, zero_stage: int, dtype: str) -> str:
    gb = lambda x: f"{x / GiB:8.2f} GiB"  # noqa: E731
    lines = [
        "dry run: config and parallel layout are valid; nothing was trained",
        f"  layout   world {world_size} = dp {dp} x sp {sp_size} ({strategy}, {layout}); micro-batch {micro} x "
        f"accumulation {grad_accum}; {est.local_tokens} tokens per rank per micro-batch",
        f"  model    {est.n_params / 1e6:.2f}M parameters, {dtype}, ZeRO stage {zero_stage} over {world_size} ranks",
        "  memory estimate per rank:",
        f"    parameters      {gb(est.params)}",
        f"    gradients       {gb(est.grads)}",
        f"    optimizer       {gb(est.optimizer)}",
        f"    activations     {gb(est.activations)}",
        f"    total (device)  {gb(est.total)}",
    ]
    if est.offloaded:
        lines.append(f"    offloaded (CPU) {gb(est.offloaded)}")
    return "\n".join(lines)
