"""Gated DeltaNet mixers head-parallel: each rank runs its share of the heads over the whole
sequence, the scalable scheme for this recurrence (what PyTorch's and Megatron's context
parallelism do for Gated DeltaNet).

Per mixer layer and rank, with the SP group of P ranks and this rank's rows x (b, s/P, D):

1. the module's own projections on the local rows: q, k (b, s/P, Hk, dk), v, z (b, s/P, Hv, dv),
   the beta and decay inputs (b, s/P, Hv); z stays local;
2. one all-to-all (``comm.heads_to_sequence``) of q, k, v, beta, decay packed per key head
   (Hk units of 2 dk + (Hv / Hk)(dv + 2) values): rank r receives every rank's tokens for its
   key heads ``ranges[r]`` (uneven when P does not divide Hk; a key head's value heads travel
   with it), put into natural order by the step's ``MixerIndex`` (packed documents: one
   right-padded row per document, so each starts from the zero state);
3. the module's depthwise causal convolution restricted to those heads' channels (a slice of
   its weight; the convolution is per channel) and the model's own chunked kernel
   (``torch_chunk_gated_delta_rule`` of the model's modeling module: flash-linear-attention's
   ``chunk_gated_delta_rule`` on GPU when installed, transformers' torch path otherwise);
4. the inverse all-to-all (``comm.sequence_to_heads``) of the output (Hv x dv per token) back
   to this rank's rows, then the module's gated norm and output projection on them.

Bytes sent per layer and rank, forward: (P-1)/P x (S/P) x (2 Hk dk + Hv (dv + 2) + Hv dv) x e
(backward the same), against (P-1)/P x S x D x e for the gathered sequence: P-fold fewer for
the same widths. The convolution and the recurrence run once over the sequence in all (1/P
per rank), and a rank holds 1/P of the heads' activations. It needs Hk >= P (a rank computes
whole key heads); below that ``SequenceMixers`` keeps the gathered sequence for the module.

transformers has no per-layer seam between the projections and the recurrence (the kernel
hub's ``kernelize`` swaps a function for every instance and device at once, while this needs
the rank's group and the step's index), so the wrapper is a forward of our own per module,
calling the module's submodules and its modeling module's kernels: ``DELTANET_FAMILIES``
describes where each family keeps them. Parameter gradients are exact: projections, norm and
output projection see this rank's rows, the convolution weight, ``A_log`` and ``dt_bias``
slices only this rank's heads, and the sequence-parallel gradient reduction sums the ranks.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..comm import heads_to_sequence, sequence_to_heads


def _qwen3_next(m, x):
    q, k, v, z, b, a = m.fix_query_key_value_ordering(m.in_proj_qkvz(x), m.in_proj_ba(x))
    return q, k, v, z, b, a


def _split_qkv(m, mixed):
    q, k, v = mixed.split([m.key_dim, m.key_dim, m.value_dim], dim=-1)
    b, s = mixed.shape[:2]
    return (q.reshape(b, s, -1, m.head_k_dim), k.reshape(b, s, -1, m.head_k_dim),
            v.reshape(b, s, -1, m.head_v_dim))


def _qwen3_5(m, x):
    q, k, v = _split_qkv(m, m.in_proj_qkv(x))
    z = m.in_proj_z(x).reshape(*v.shape)
    return q, k, v, z, m.in_proj_b(x), m.in_proj_a(x)


def _olmo_hybrid(m, x):
    q, k, v = _split_qkv(m, torch.cat([m.q_proj(x), m.k_proj(x), m.v_proj(x)], -1))
    return q, k, v, m.g_proj(x).reshape(*v.shape), m.b_proj(x), m.a_proj(x)


@dataclass(frozen=True)
class DeltaNetParts:
    """Where a Gated DeltaNet family keeps its pieces (read from its transformers forward)."""

    project: Callable  # (module, x) -> q, k (b,s,Hk,dk); v, z (b,s,Hv,dv); beta_in, a (b,s,Hv)
    norm: str  # gated RMSNorm (output, z) per value head
    out: str  # output projection
    beta_scale: Callable[[nn.Module], float] = lambda m: 1.0


DELTANET_FAMILIES = {
    "Qwen3NextGatedDeltaNet": DeltaNetParts(_qwen3_next, "norm", "out_proj"),
    "Qwen3_5GatedDeltaNet": DeltaNetParts(_qwen3_5, "norm", "out_proj"),
    "Qwen3_5MoeGatedDeltaNet": DeltaNetParts(_qwen3_5, "norm", "out_proj"),
    "OlmoHybridGatedDeltaNet": DeltaNetParts(
        _olmo_hybrid, "o_norm", "o_proj", lambda m: 2.0 if m.allow_neg_eigval else 1.0),
}


def key_heads(module: nn.Module) -> int:
    return int(module.num_k_heads)


def bytes_per_layer(module: nn.Module, seqlen: int, world: int, element_size: int) -> int:
    """Bytes this scheme sends per layer and rank in forward (both all-to-alls)."""
    m = module
    width = 2 * m.key_dim + m.num_v_heads * (m.head_v_dim + 2) + m.value_dim
    return (world - 1) * (seqlen // world) * width * element_size // world


def head_parallel_forward(module: nn.Module, x: torch.Tensor, index, ranges) -> torch.Tensor:
    """(b, s/P, D) local rows in layout order -> the mixer's output for them (b, s/P, D).
    ``index``: the step's ``MixerIndex``; ``ranges``: every rank's [lo, hi) key heads."""
    m, parts = module, DELTANET_FAMILIES[type(module).__name__]
    kernels = sys.modules[type(m).__module__]
    b, s = x.shape[:2]
    q, k, v, z, beta_in, a = parts.project(m, x)
    hk, hv = q.shape[2], v.shape[2]
    per = hv // hk  # value heads per key head: they travel with it
    dk, dv = m.head_k_dim, m.head_v_dim
    packed = torch.cat([q, k, v.reshape(b, s, hk, per * dv), beta_in.reshape(b, s, hk, per),
                        a.reshape(b, s, hk, per)], -1)
    lo, hi = ranges[0 if index.world == 1 else index.rank]
    mine = heads_to_sequence(packed, ranges, index.group)  # (b, S, n, w), rank-major
    n = hi - lo
    seq = index.natural(mine.flatten(2)).unflatten(-1, (n, -1))  # (rows, L, n, w)
    q, k, v, beta_in, a = seq.split([dk, dk, per * dv, per, per], -1)
    rows, length = seq.shape[:2]

    # the depthwise convolution of these heads' channels: q, k, v channel blocks of the weight
    vlo, vhi = lo * per, hi * per
    channels = [slice(lo * dk, hi * dk), slice(m.key_dim + lo * dk, m.key_dim + hi * dk),
                slice(2 * m.key_dim + vlo * dv, 2 * m.key_dim + vhi * dv)]
    weight = torch.cat([m.conv1d.weight[c] for c in channels]).squeeze(1)
    bias = None if m.conv1d.bias is None else torch.cat([m.conv1d.bias[c] for c in channels])
    mixed = torch.cat([q.flatten(2), k.flatten(2), v.flatten(2)], -1).transpose(1, 2)
    mixed = kernels.causal_conv1d_fn(mixed, weight, bias, activation=m.activation).transpose(1, 2)
    q, k, v = mixed.split([n * dk, n * dk, n * per * dv], -1)
    q, k = q.reshape(rows, length, n, dk), k.reshape(rows, length, n, dk)
    v = v.reshape(rows, length, n * per, dv)
    beta = beta_in.reshape(rows, length, n * per).sigmoid() * parts.beta_scale(m)
    g = -m.A_log[vlo:vhi].float().exp() * F.softplus(
        a.reshape(rows, length, n * per).float() + m.dt_bias[vlo:vhi])
    out, _ = kernels.torch_chunk_gated_delta_rule(q, k, v, g=g, beta=beta, initial_state=None,
                                                  output_final_state=False,
                                                  use_qk_l2norm_in_kernel=True)
    out = index.rank_major(out.reshape(rows, length, n * per * dv))  # (b, S, n * per * dv)
    out = sequence_to_heads(out.unflatten(-1, (n, per * dv)), ranges, index.group)
    out = getattr(m, parts.norm)(out.reshape(-1, dv), z.reshape(-1, dv))
    return getattr(m, parts.out)(out.reshape(b, s, hv * dv))
