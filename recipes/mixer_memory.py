"""The activation memory of a hybrid model's recurrent mixer layers, measured per token.

A mixer's working set depends on the kernel that runs it far more than a softmax layer's does
(transformers' PyTorch paths keep fp32 chunk matrices and per-chunk states; the fused
flash-linear-attention and mamba_ssm kernels recompute them), so it is measured, not
modelled: the model's own mixer module -- one layer, the checkpoint's real widths, random
weights, the run's dtype -- runs forward and backward at two lengths (multiples of every
family's chunk size) with its memory counted (``recipes.memory.PeakMemory``: the CUDA
allocator's peak, or on CPU every live tensor). The slope between them is the cost per
token; constants (parameter gradients) drop out. It runs where the planner runs: on a GPU
with flash-linear-attention / mamba_ssm installed it measures those kernels; on a CPU,
transformers' PyTorch paths, which keep every chunk's intermediates (Mamba2's chunk-by-chunk
matrices in fp32) where the fused kernels recompute them, so a CPU plan is on the safe side.

Two figures per mixer class (``MixerMemory``):

* ``recompute``: the peak of one checkpointed layer's backward (``torch.utils.checkpoint``,
  non-reentrant as transformers uses it: recompute, then backward), less the layer's input,
  output and their gradients, which the estimate's layer term already counts;
* ``kept``: what one layer keeps from its forward for the backward without checkpointing,
  and ``transient``: what its backward adds to that at its peak.

Both are per token the mixer runs over. Under sequence parallelism a rank runs its heads over
the whole sequence (head/channel-parallel: ``mixer_heads.work_share`` times its local tokens,
1 for an even split; Gated DeltaNet's value-channel slices count their key head's work), the
whole sequence with every head (fewer heads than ranks: the gathered sequence,
P times), or its own tokens plus a few halo rows (short convolutions: 1 times):
``MixerMemory.tokens_factor``.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint

from recipes.memory import PeakMemory

# two lengths, multiples of every family's chunk size in transformers' PyTorch paths (64 for
# Gated DeltaNet and KDA, mamba_chunk_size <= 256 for Mamba2, lightning's block_size 256)
LENGTHS = (256, 512)


@dataclass(frozen=True)
class MixerMemory:
    """A hybrid's largest mixer layer, per token it runs over (bytes), for one SP world."""

    families: tuple  # the mixer families measured (e.g. ("gated_deltanet",))
    layers: int  # decoder layers holding a mixer
    recompute: float  # one checkpointed layer's backward, beyond its input/output (+ gradients)
    kept: float  # one layer's saved tensors between forward and backward (no checkpointing)
    transient: float  # one layer's backward beyond what it kept (no checkpointing)
    measured_on: str  # the device the figures were measured on ("cpu": transformers' PyTorch paths)
    tokens_factor: float  # tokens the mixer runs over per local token on one rank (see module doc)
    beside_attention: bool  # a layer runs the mixer and softmax attention side by side (Falcon-H1)


def _run(module, hidden: int, n: int, dtype, device, checkpointed: bool):
    """(peak, kept) bytes of one forward + backward of ``module`` over n tokens."""
    extra = [p.name for p in list(inspect.signature(type(module).forward).parameters.values())[2:]
             if p.default is inspect.Parameter.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    kwargs = dict.fromkeys(extra)  # e.g. lightning's position_embeddings / attention_mask: unused, None

    def forward(x):
        out = module(x, **kwargs)
        return out[0] if isinstance(out, tuple) else out

    x = torch.randn(1, n, hidden, dtype=dtype, device=device, requires_grad=True)
    with PeakMemory(device) as mem:
        out = checkpoint(forward, x, use_reentrant=False) if checkpointed else forward(x)
        kept = mem.live_bytes - out.untyped_storage().nbytes()
        out.backward(torch.ones_like(out))
    return mem.peak_bytes, kept


def measure(module, hidden: int, dtype: torch.dtype, device: torch.device) -> tuple[float, float, float]:
    """(recompute, kept, transient) bytes per token of ``module`` (a mixer with real tensors) on
    ``device``; see ``MixerMemory``."""
    module = module.to(device, dtype)
    b = torch.finfo(dtype).bits // 8
    (p1, _), (p2, _) = (_run(module, hidden, n, dtype, device, True) for n in LENGTHS)
    (q1, k1), (q2, k2) = (_run(module, hidden, n, dtype, device, False) for n in LENGTHS)
    span = LENGTHS[1] - LENGTHS[0]
    io = 3 * hidden * b  # the input, the output and their gradients: the layer term counts them
    recompute, kept, peak = ((hi - lo) / span for lo, hi in ((p1, p2), (k1, k2), (q1, q2)))
    return max(0.0, recompute - io), max(0.0, kept), max(0.0, peak - kept - io)


def materialize(module, seed: int = 0) -> None:
    """Real CPU tensors for the meta-device parameters of ``module``, small random values
    (memory does not depend on them, but no inf/NaN); its buffers (real already under
    ``init_empty_weights``, e.g. lightning's decay rates) are left as built."""
    g = torch.Generator().manual_seed(seed)
    for sub in module.modules():
        for name, p in list(sub._parameters.items()):
            if p is not None and p.is_meta:
                sub._parameters[name] = torch.nn.Parameter(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.02,
                                                           requires_grad=p.requires_grad)
        for name, t in list(sub._buffers.items()):
            if t is not None and t.is_meta:
                sub._buffers[name] = torch.zeros(t.shape, dtype=t.dtype)
