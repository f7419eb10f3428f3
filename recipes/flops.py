"""FLOPs for reporting (MFU, achieved TFLOP/s), in one convention everywhere.

The convention of PaLM (appendix B) and torchtitan: a matmul of m x k by k x n is 2mkn
FLOPs; backward costs 2x forward (one matmul for the input gradient, one for the weight
gradient), so forward + backward = 3x forward, i.e. 6 N FLOPs per token for N parameters.
Recomputation (activation checkpointing, the tiled loss and MLP, flash-style attention
backward) is real work the hardware does but is not counted: MFU compares the model's FLOPs,
not the implementation's, with the peak.
"""
from __future__ import annotations

BACKWARD_FACTOR = 2.0  # backward FLOPs / forward FLOPs


def attention_flops(batch: int, seqlen: int, heads: int, head_dim: int, causal: bool,
                    backward: bool) -> float:
    """Scores and weighted values: forward 4*b*s^2*h*d (causal: half); with ``backward``,
    forward + backward = (1 + BACKWARD_FACTOR) x forward."""
    fwd = 4 * batch * seqlen**2 * heads * head_dim * (0.5 if causal else 1.0)
    return fwd * (1 + BACKWARD_FACTOR if backward else 1.0)


def model_flops(params: int, tokens: int) -> float:
    """Forward + backward matmul FLOPs of ``params`` weights over ``tokens`` tokens: 6 N T."""
    return 2 * (1 + BACKWARD_FACTOR) * params * tokens
