"""Memory model per rank: what one rank holds on its device for one micro-batch of its sequence
shard, term by term. Arithmetic only -- nothing is allocated. Used by the dry run
(``trainer.dry_run=true``), the planner (``recipes.capacity``) and the memory benchmark, which
checks it against measured peaks (tests/test_capacity.py: within 20 % on CPU).

Static terms. ZeRO partitions over the whole world (dp x sp): DeepSpeed is given no ``mpu``
and treats every rank as a replica (see recipes/engine.py). Bytes per parameter follow the
ZeRO paper: fp32 keeps 4 (param) + 4 (grad) + 8 (Adam m, v); bf16 keeps 2 + 2 + 12 (fp32
master copy, m, v). ZeRO-Offload moves the optimizer states / parameters to host memory.
While activations peak, the input embedding's gradient (produced last) does not exist yet.

Terms that grow with the local tokens T (b = bytes per element of the model's dtype); the
peak is what stays for the step plus the larger of two phases that never overlap, one
layer's backward or the head + loss backward:
* saved layer inputs: with activation checkpointing one hidden state per layer, L*d*b*T; in
  host memory with ``offload_activations`` on CUDA. Without checkpointing every layer keeps
  its whole working set instead.
* one layer in backward (its recompute and its gradients): norms, q/k/v, attention output,
  residuals and the gradients flowing through them: ``LAYER_HIDDEN`` hidden-sized tensors per
  token, plus SwiGLU's ``LAYER_FFN`` ffn-wide ones -- unless the MLP is tiled, which makes
  those a constant tile.
* the head and loss: untiled, the (T x vocab) logits in the model dtype, their fp32 copy and
  its fp32 gradient; tiled, only the final hidden state and a 4-byte log-sum-exp per token
  stay (our Llama recomputes the final norm per tile too) -- the tile's logits are a constant.
* ring attention (ring size > 1): dK/dV travelling in fp32 with their receive buffers during
  a layer's backward; Ulysses: the all-to-all copies of q, k, v and the output; all-gather:
  during one layer's backward the whole sequence's K/V (S = T x P tokens) gathered again, its
  fp32 dK/dV accumulators and one block's fp32 gradients (nothing sequence-sized is kept
  between layers: each layer saves only its K/V shard).
Constant terms: a loss tile (fp32 logits + their gradient) and an MLP tile.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Tuple

GiB = 2**30

# Tensors per token alive while the backward of one checkpointed layer runs (recomputed
# activations + gradients), measured for ringattn's Llama block on CPU (fp32, peak over
# forward+backward at two lengths, slope per token; 4 layers, d=256, ffn 704): 6 hidden-sized
# and 2.7 ffn-sized (rounded up to 3) -- PyTorch frees the MLP's tensors as its backward passes
# them, so not all of them are alive at once. Without checkpointing each layer keeps
# 5 hidden-sized and 4 ffn-sized tensors per token (measured the same way).
LAYER_HIDDEN = 6
LAYER_FFN = 3
# The attention's backward runs after the MLP's (their temporaries never coexist): a fused
# kernel (sp=1, Ulysses) adds ~1.2 hidden-sized tensors per token (measured); the ring's
# block-by-block backward adds its fp32 accumulators and per-block copies (see estimate()).
ATTN_FUSED = 2
# All-gather's backward: fp32 K/V-sized tensors of the whole sequence alive with the gathered
# K/V: the dK/dV accumulators and one block's gradients (measured on CPU, see estimate()).
AG_FP32 = 2
KEPT_HIDDEN = 5
KEPT_FFN = 4


@dataclass(frozen=True)
class ActivationOptions:
    """What shapes the sequence-dependent memory (the model's options, and where it runs)."""

    checkpointing: bool = False
    offload: bool = False  # saved layer inputs in host memory (takes effect on CUDA only)
    tiled_loss: bool = True
    loss_tile_tokens: Optional[int] = None
    tiled_mlp: bool = False
    mlp_tile_tokens: Optional[int] = None
    device_type: str = "cuda"
    norm_in_loss: bool = True  # the final norm runs per tile inside the tiled loss (our Llama; not HF)

    @property
    def offloaded(self) -> bool:
        return self.checkpointing and self.offload and self.device_type == "cuda"


def options_of(model, device_type: str = "cuda") -> ActivationOptions:
    """The options of a recipe's model object (``recipes.models.resolve``)."""
    from recipes.models import is_hf

    c = model.cfg
    return ActivationOptions(checkpointing=c.activation_checkpointing, offload=c.offload_activations,
                             tiled_loss=c.tiled_loss, loss_tile_tokens=c.loss_tile_tokens, tiled_mlp=c.tiled_mlp,
                             mlp_tile_tokens=c.mlp_tile_tokens, device_type=device_type, norm_in_loss=not is_hf(c))


@dataclass
class MemoryEstimate:
    params: float  # bytes on the device, per rank
    grads: float
    optimizer: float
    activations: float
    offloaded: float  # bytes per rank kept in host memory instead (ZeRO-Offload, activation offload)
    n_params: int
    local_tokens: int  # tokens of one micro-batch on one rank
    terms: List[Tuple[str, float, str]] = field(default_factory=list)  # (name, device bytes, why)
    # gradient bytes not yet allocated while activations peak: the (untied) input embedding's,
    # which backward produces last, after the activations are freed
    late_grads: float = 0.0

    @property
    def total(self) -> float:
        return self.params + self.optimizer + max(self.grads, self.grads - self.late_grads + self.activations)


def estimate(model, dtype: str, zero_stage: int, offload_optimizer: bool, offload_param: bool,
             world_size: int, sp_size: int, micro: int, seq_len: int,
             options: ActivationOptions = ActivationOptions(), ulysses_size: int = 1,
             strategy: Optional[str] = None, mixers=None) -> MemoryEstimate:
    """``model``: the ``recipes.models.ModelShape`` of the recipe's model object. ``ulysses_size``:
    the all-to-all degree inside the SP group (1: ring only; sp_size: Ulysses only).
    ``strategy``: "allgather" for the all-gather strategy (ulysses_size 1); otherwise what
    ``ulysses_size`` says (ring, Ulysses or hybrid). ``mixers``: a hybrid's measured
    ``recipes.mixer_memory.MixerMemory`` for this SP world (the model object's
    ``mixer_memory``), None for attention-only models."""
    if strategy == "allgather" and ulysses_size != 1:
        raise ValueError(f"strategy=allgather gathers K/V instead of an all-to-all: ulysses_size must be 1, "
                         f"got {ulysses_size}")
    from ringattn.models import tiling  # the tile sizes the model will use

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

    T = micro * seq_len // sp_size
    d, kv, f, V, L = model.dim, model.kv_dim, model.ffn_dim, model.vocab_size, model.n_layers
    # activations = what stays for the whole step + the larger of the two backward phases
    # (one layer's backward, or the head + loss backward): they never overlap.
    terms = []
    # RMSNorm computes in fp32: below fp32 its saved normalised input is an fp32 copy as well
    upcast = 2 * d * (4 - b)
    if options.tiled_loss and options.norm_in_loss:
        terms.append(("final hidden + ids", (d * b + 4 + 16) * T,
                      "the last layer's output (the final norm is recomputed per loss tile), 4-byte lse, "
                      "token ids and labels"))
    else:
        terms.append(("final hidden + ids", (2 * d * b + upcast + 4 + 16) * T,
                      "final norm input and output (kept for the head; fp32 upcasts below fp32), 4-byte lse, "
                      "token ids and labels"))
    if options.checkpointing:
        saved = L * d * b * T
        if options.offloaded:
            offloaded += saved
            terms.append(("saved layer inputs", 0.0, f"{L} x d x T in pinned host memory "
                                                     f"({saved / GiB:.2f} GiB there)"))
        else:
            terms.append(("saved layer inputs", saved, f"activation checkpointing: {L} layers x d={d} x T"))
    if options.tiled_mlp:
        ffn_tokens = min(T, tiling.mlp_tile_tokens(f, b, options.mlp_tile_tokens))
        mlp_why = f"tiled: ffn-wide tensors of one {ffn_tokens}-token tile"
    else:
        ffn_tokens = T
        mlp_why = "ffn-wide tensors per token"
    if not options.checkpointing:  # kept through the whole backward: under the loss phase too
        terms.append(("all layers kept", L * (KEPT_HIDDEN * d * b * T + KEPT_FFN * f * b * ffn_tokens),
                      f"no checkpointing: {L} layers x ({KEPT_HIDDEN} d-sized + {KEPT_FFN} {mlp_why})"))
        if mixers is not None:
            terms.append(("mixer layers kept", mixers.layers * mixers.kept * mixers.tokens_factor * T,
                          f"no checkpointing: {mixers.layers} mixer layers x {mixers.kept / 1e3:.1f} KB per token "
                          f"run x {mixers.tokens_factor:g} x T ({_measured(mixers)})"))
    layer = []  # one layer's backward: its base set, then the MLP's and the attention's in turn
    if options.checkpointing:
        layer.append(("layer backward", (LAYER_HIDDEN * d * b + upcast) * T,
                      f"one layer recomputed + its gradients: {LAYER_HIDDEN} d-sized per token "
                      "(+ the norms' fp32 upcasts below fp32)"))
        mlp = ("MLP backward", LAYER_FFN * f * b * ffn_tokens, f"{LAYER_FFN} {mlp_why} (f={f})")
    else:
        mlp = ("MLP backward", 0.0, "(kept above)")
    if strategy == "allgather" and sp_size > 1:
        S = T * sp_size
        attn = ("attention backward", d * (4 + 4 * b) * T + 2 * kv * (b + AG_FP32 * 4) * S,
                f"all-gather: the K/V of all {S} tokens gathered again (model dtype), their fp32 dK/dV "
                "accumulators and one block's fp32 gradients, and the fp32 dq accumulator (measured on CPU)")
    elif sp_size // ulysses_size > 1:
        attn = ("attention backward", (d * (4 + 4 * b) + kv * (16 + 2 * b)) * T,
                "ring: fp32 dq accumulator, per-block dq/dk/dv and contiguous copies, dK/dV travelling "
                "in fp32 double-buffered (measured on CPU)")
    elif ulysses_size > 1:
        attn = ("attention backward", (ATTN_FUSED * d * b + (d + kv) * b) * T,
                "Ulysses: fused kernel over the full sequence for 1/P of the heads, plus the all-to-all "
                "copies in flight (one q- and one kv-sized; measured on CPU)")
    else:
        attn = ("attention backward", ATTN_FUSED * d * b * T, "one fused kernel's backward (measured on CPU)")
    if mixers is not None:
        per_token = mixers.recompute if options.checkpointing else mixers.transient
        mixer = per_token * mixers.tokens_factor * T
        why = (f"{', '.join(mixers.families)}: {per_token / 1e3:.1f} KB per token run x "
               f"{mixers.tokens_factor:g} x T ({_measured(mixers)})")
        if mixers.beside_attention:  # one layer holds both working sets
            attn = ("attention + mixer backward", attn[1] + mixer, f"{attn[2]}; with the mixer beside it, {why}")
        elif mixer > attn[1]:
            attn = ("mixer backward", mixer, f"{why}; a softmax layer's is smaller ({attn[1] / GiB:.2f} GiB)")
    big, small = (mlp, attn) if mlp[1] >= attn[1] else (attn, mlp)
    layer += [big, (small[0], 0.0, f"(not at the peak: {small[1] / GiB:.2f} GiB, after/before the other) "
                                   f"{small[2]}")]
    if options.tiled_loss:
        tile = min(T, tiling.loss_tile_tokens(V, options.loss_tile_tokens))
        loss = [("loss tile", (4 + (2 * b if b < 4 else 0)) * V * tile + 4 * V * d,
                 f"fp32 logits of one {tile}-token tile (+ model-dtype copies) and the fp32 dW accumulator")]
    else:
        loss = [("logits + loss", V * (b + 8) * T,
                 f"untiled: T x vocab ({V}) logits, the fp32 log-softmax and its gradient")]
    phase = max((layer, loss), key=lambda ts: sum(t[1] for t in ts))
    other = loss if phase is layer else layer
    terms += phase
    terms += [(name, 0.0, f"(not at the peak: {sum(t[1] for t in other) / GiB:.2f} GiB, another phase) {why}")
              for name, _, why in other]
    activations = sum(t[1] for t in terms)
    untied = model.embedding_params >= 2 * V * d
    late = V * d * b / (w if zero_stage >= 2 else 1) if untied else 0.0
    return MemoryEstimate(params, grads, optimizer, activations, offloaded, n, T, terms, late)


def _measured(mixers) -> str:
    if mixers.measured_on == "cpu":
        return "measured on CPU: transformers' PyTorch path; less with the fused GPU kernels"
    return f"measured on {mixers.measured_on} with the installed kernels"


def max_seq_len(fits, start: int, divisor: int) -> int:
    """The largest multiple of ``divisor`` for which ``fits(seq_len)`` holds (0: none), by doubling
    then bisection (memory grows with seq_len)."""
    if not fits(divisor):
        return 0
    lo, hi = divisor, max(divisor, start)
    while fits(hi):
        lo, hi = hi, hi * 2
    while hi - lo > divisor:
        mid = (lo + hi) // 2 // divisor * divisor
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


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
    ]
    lines += [f"      {name:<22}{gb(v)}  {why}" for name, v, why in est.terms]
    lines.append(f"    total (device)  {gb(est.total)}")
    if est.offloaded:
        lines.append(f"    offloaded (host) {gb(est.offloaded)}")
    return "\n".join(lines)
