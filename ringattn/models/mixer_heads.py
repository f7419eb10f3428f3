"""Recurrent mixers head-parallel: each rank runs its share of the heads over the whole
sequence, the scalable scheme for Gated DeltaNet (Qwen3-Next, Qwen3.5, OLMo-Hybrid; what
PyTorch's and Megatron's context parallelism do), KDA (Kimi-Linear, Bailing-Hybrid), lightning
attention (MiniMax) and Mamba2 (Nemotron-H, Granite-MoE-Hybrid, Bamba, Falcon-H1, Zamba2;
Megatron's Mamba context parallelism), and Jamba's Mamba channel-parallel (``mamba_forward``).

Per mixer layer and rank, with the SP group of P ranks and this rank's rows x (b, s/P, D):

1. the module's own projections on the local rows; the gate (z) stays local;
2. one all-to-all (``comm.heads_to_sequence``) of the recurrence's per-head inputs: rank r
   receives every rank's tokens for its heads ``split.q[r]`` (uneven when P does not divide
   them), put into natural order by the step's ``MixerIndex`` (packed documents: one
   right-padded row per document, so each starts from the zero state, in batches of similar
   length, ``mixers.document_batches``: step 3 runs once per batch). Gated DeltaNet packs
   q, k, v, beta and decay inputs per key head (a key head's value heads travel with it);
   KDA packs q, k, v, beta per head and sends its per-channel decay in a second all-to-all;
   lightning attention sends q, k, v per head; Mamba2 sends x and dt per head and, in a
   second all-to-all, B and C per group to every rank whose heads read that group
   (``split.kv[r]``; ranges may overlap when groups < ranks);
3. the module's depthwise causal convolution restricted to those channels (a slice of its
   weight: the convolution is per channel) and the model's own chunked kernel, looked up in
   the model's modeling module (``torch_chunk_gated_delta_rule`` /
   ``chunk_kimi_delta_attention`` / ``mamba2_chunk_scan``: flash-linear-attention's and
   mamba_ssm's kernels on GPU when installed, transformers' torch paths otherwise; MiniMax
   keeps its lightning recurrence inline in the module's forward, so ``_lightning`` is that
   loop on the module's per-head buffers);
4. the inverse all-to-all (``comm.sequence_to_heads``) of the output back to this rank's rows,
   then the module's gated norm (over all heads of a token) and output projection on them.

The recurrence and the convolution run once over the sequence in all (1/P per rank) and a
rank holds 1/P of their activations; ``bytes_sent`` gives the traffic (Gated DeltaNet at
Qwen3-Next-80B's widths over 16 ranks sends 11,580 values per local token against 30,720 for
the gathered scheme). It needs heads >= P (a rank computes whole heads); Gated DeltaNet also
runs with fewer key heads than ranks where they divide P, each value head's channels in P / Hk
slices (a rank: one key head, one slice of its value channels). Below that
``SequenceMixers`` keeps the gathered sequence.

transformers has no per-layer seam between the projections and the recurrence (the kernel
hub's ``kernelize`` swaps a function for every instance and device at once, while this needs
the rank's group and the step's index), so the wrapper is a forward of our own per module,
calling the module's submodules and its modeling module's kernels; ``HEAD_PARALLEL``
describes where each family keeps them (read from the families' transformers 5.25 forwards).
Parameter gradients are exact: projections, norm and output projection see this rank's rows,
the convolution weight and the per-head parameters (``A_log``, ``dt_bias``, ``D``) slices of
this rank's heads, and the sequence-parallel gradient reduction sums the ranks.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..comm import heads_to_sequence, sequence_to_heads, sum_over_ranks
from ..headsplit import HeadSplit, split_heads


# ------------------------------------------------------------------ shared by the families

def _gather_heads(per_head: torch.Tensor, ranges, index) -> torch.Tensor:
    """(b, s/P, H, w) local rows -> every token of this rank's ``n`` heads of ``ranges`` in
    the mixer's natural order: (b, S, n, w), or with documents (1, padded, n, w), their
    right-padded batches end to end (``index.per_batch`` runs the recurrence per batch)."""
    mine = heads_to_sequence(per_head, ranges, index.group)  # (b, S, n, w), rank-major
    return index.natural(mine)


def _scatter_heads(out: torch.Tensor, ranges, index) -> torch.Tensor:
    """Inverse of ``_gather_heads`` for the output: natural order -> (b, s/P, H, w)."""
    return sequence_to_heads(index.rank_major(out), ranges, index.group)


def _conv(module, kernels, channels) -> Callable[[torch.Tensor], torch.Tensor]:
    """The module's depthwise causal convolution (and activation) restricted to ``channels``
    (slices of its weight, cut once per layer, not per batch of documents), as a function of
    the input (rows, L, C): the model's own ``causal_conv1d_fn``."""
    conv = module.conv1d
    weight = torch.cat([conv.weight[c] for c in channels]).squeeze(1)
    bias = None if conv.bias is None else torch.cat([conv.bias[c] for c in channels])

    def run(mixed: torch.Tensor) -> torch.Tensor:
        out = kernels.causal_conv1d_fn(mixed.transpose(1, 2), weight, bias, activation=module.activation)
        return out.transpose(1, 2)

    return run


def _sent(split: HeadSplit, rank: int, local: int, per_unit: dict) -> int:
    """Values this rank sends in the all-to-alls: to every other rank j, its local tokens'
    units of j (``per_unit["q"]`` values per head of ``split.q[j]``, ``per_unit["kv"]`` per
    group of ``split.kv[j]``), and back its own heads' outputs for j's tokens."""
    other = [j for j in range(split.size) if j != rank]
    width = lambda r, kind: (r[1] - r[0]) * per_unit.get(kind, 0)  # noqa: E731
    forward = sum(width(split.q[j], "q") + width(split.kv[j], "kv") for j in other)
    return local * (forward + len(other) * width(split.q[rank], "out"))


# ------------------------------------------------------------------ Gated DeltaNet

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
    """Where a Gated DeltaNet family keeps its pieces."""

    project: Callable  # (module, x) -> q, k (b,s,Hk,dk); v, z (b,s,Hv,dv); beta_in, a (b,s,Hv)
    norm: str  # gated RMSNorm (output, z) per value head
    out: str  # output projection
    beta_scale: Callable[[nn.Module], float] = lambda m: 1.0


def deltanet_forward(m: nn.Module, x: torch.Tensor, index, split: HeadSplit) -> torch.Tensor:
    """(b, s/P, D) local rows in layout order -> the mixer's output for them (b, s/P, D). The
    units of ``split.q`` are key heads (their value heads travel with them), or, with more
    ranks than key heads, slices of their value heads' channels (``split.kv``: each unit's key
    head): the state's value channels evolve independently, so a slice runs the recurrence
    with its key head's q, k, beta and decay and gives the output's same channels, exactly."""
    parts, kernels = _family(m).parts, sys.modules[type(m).__module__]
    b, s = x.shape[:2]
    q, k, v, z, beta_in, a = parts.project(m, x)
    hk, hv = q.shape[2], v.shape[2]
    per = hv // hk  # value heads per key head
    dk, dv = m.head_k_dim, m.head_v_dim
    slices = split.heads // hk  # of each value head's channels (1: whole key heads a rank)
    dc = dv // slices
    keyed = torch.cat([q, k, beta_in.reshape(b, s, hk, per), a.reshape(b, s, hk, per)], -1)
    valued = v.reshape(b, s, hk, per, slices, dc).transpose(3, 4).reshape(b, s, hk * slices, per * dc)
    lo, hi = split.q[index.rank]  # units
    klo, khi = split.kv[index.rank]  # their key heads (the same ranges with one slice)
    vlo, vhi = klo * per, khi * per
    v_at = [2 * m.key_dim + ((u // slices) * per + i) * dv + (u % slices) * dc
            for u in range(lo, hi) for i in range(per)]  # each unit's value channels, per value head
    conv = _conv(m, kernels, [slice(klo * dk, khi * dk), slice(m.key_dim + klo * dk, m.key_dim + khi * dk),
                              *(slice(c, c + dc) for c in v_at)])
    if slices == 1:  # one all-to-all: a key head's inputs travel together
        inputs = (_gather_heads(torch.cat([keyed, valued], -1), split.q, index),)
    else:  # q, k, beta and decay to every rank holding a slice of the key head
        inputs = (_gather_heads(keyed, split.kv, index), _gather_heads(valued, split.q, index))

    def run(*seqs):  # (rows, L, n, w) one batch (key-head inputs, value slices)
        keyed, valued = seqs if len(seqs) == 2 else seqs[0].split([2 * dk + 2 * per, per * dc], -1)
        rows, length, n = keyed.shape[:3]
        q, k, beta_in, a = keyed.split([dk, dk, per, per], -1)
        mixed = conv(torch.cat([q.flatten(2), k.flatten(2), valued.flatten(2)], -1))
        q, k, v = mixed.split([n * dk, n * dk, n * per * dc], -1)
        q, k = q.reshape(rows, length, n, dk), k.reshape(rows, length, n, dk)
        v = v.reshape(rows, length, n * per, dc)
        beta = beta_in.reshape(rows, length, n * per).sigmoid() * parts.beta_scale(m)
        g = -m.A_log[vlo:vhi].float().exp() * F.softplus(
            a.reshape(rows, length, n * per).float() + m.dt_bias[vlo:vhi])
        out, _ = kernels.torch_chunk_gated_delta_rule(q, k, v, g=g, beta=beta, initial_state=None,
                                                      output_final_state=False,
                                                      use_qk_l2norm_in_kernel=True)
        return out.reshape(rows, length, n, per * dc)

    out = _scatter_heads(index.per_batch(run, *inputs), split.q, index)  # (b, s/P, units, per dc)
    out = out.reshape(b, s, hk, slices, per, dc).transpose(3, 4).reshape(b, s, hv, dv)
    out = getattr(m, parts.norm)(out.reshape(-1, dv), z.reshape(-1, dv))
    return getattr(m, parts.out)(out.reshape(b, s, hv * dv))


def _deltanet_split(m, world: int) -> Optional[HeadSplit]:
    """Key heads over the ranks; with fewer key heads than ranks, each value head's channels
    in world / key heads slices (where that divides them), else None (the gathered sequence)."""
    hk, dv = int(m.num_k_heads), int(m.head_v_dim)
    if hk >= world:
        return split_heads(hk, hk, world)
    slices = world // hk
    if world % hk or dv % slices:
        return None
    return split_heads(hk * slices, hk, world)  # unit u reads key head u // slices


def _deltanet_sent(m, split: HeadSplit, rank: int, local: int) -> int:
    per = m.num_v_heads // m.num_k_heads
    dc = m.head_v_dim // (split.heads // m.num_k_heads)
    return _sent(split, rank, local, {"q": per * dc, "kv": 2 * m.head_k_dim + 2 * per, "out": per * dc})


# ------------------------------------------------------------------ KDA

@dataclass(frozen=True)
class KDAParts:
    """Where a KDA family keeps its output gate (``gate(module, x)`` -> (b, s, H * d))."""

    gate: Callable


def kda_forward(m: nn.Module, x: torch.Tensor, index, split: HeadSplit) -> torch.Tensor:
    """KDA (Kimi-Linear; Bailing-Hybrid's linear layers): Gated DeltaNet with a decay per
    channel. q, k, v and the beta input travel packed per head, the decay (computed per token
    on the local rows, in its own dtype: float32 for Kimi-Linear) in a second all-to-all."""
    parts, kernels = _family(m).parts, sys.modules[type(m).__module__]
    b, s = x.shape[:2]
    heads, d, width = m.num_heads, m.head_dim, m.qkv_dim
    packed = torch.cat([m.q_proj(x).view(b, s, heads, d), m.k_proj(x).view(b, s, heads, d),
                        m.v_proj(x).view(b, s, heads, d), m.b_proj(x).unsqueeze(-1)], -1)
    lo, hi = split.q[index.rank]
    conv = _conv(m, kernels, [slice(lo * d, hi * d), slice(width + lo * d, width + hi * d),
                              slice(2 * width + lo * d, 2 * width + hi * d)])

    def run(seq, decay):  # (rows, L, n, 3 d + 1), (rows, L, n, d): one batch
        rows, length, n = seq.shape[:3]
        q, k, v, beta_in = seq.split([d, d, d, 1], -1)
        mixed = conv(torch.cat([q.flatten(2), k.flatten(2), v.flatten(2)], -1))
        q, k, v = (t.reshape(rows, length, n, d) for t in mixed.split([n * d] * 3, -1))
        out, _ = kernels.chunk_kimi_delta_attention(
            q, k, v, g=decay, beta=beta_in.squeeze(-1).sigmoid(), initial_state=None,
            output_final_state=False, use_qk_l2norm_in_kernel=True)
        return out

    out = index.per_batch(run, _gather_heads(packed, split.q, index),
                          _gather_heads(m.forget_gate(x), split.q, index))
    out = _scatter_heads(out, split.q, index)  # (b, s/P, H, d)
    out = m.o_norm(out, parts.gate(m, x).view(b, s, heads, d))
    return m.o_proj(out.reshape(b, s, width))


def _kda_split(m, world: int) -> Optional[HeadSplit]:
    heads = int(m.num_heads)
    return split_heads(heads, heads, world) if heads >= world else None


def _kda_sent(m, split: HeadSplit, rank: int, local: int) -> int:
    return _sent(split, rank, local, {"q": 4 * m.head_dim + 1, "out": m.head_dim})


# ------------------------------------------------------------------ lightning attention

def _lightning(m, q, k, v, lo: int, hi: int) -> torch.Tensor:
    """MiniMax's lightning attention over heads [lo, hi): (rows, n, L, d) q, k, v -> out.
    transformers keeps no kernel function for it (the block recurrence is inline in
    ``MiniMaxLightningAttention.forward``); this is that loop, line for line, on the module's
    per-head decay buffers sliced to these heads (the forward without a cache)."""
    rows, n, length, d = q.shape
    block = m.block_size
    slope = m.slope_rate[lo:hi]
    state = torch.zeros(rows, n, d, d, device=v.device, dtype=v.dtype)
    out = []
    for start in range(0, length, block):
        size = min(block, length - start)
        qb, kb, vb = (t[:, :, start:start + size] for t in (q, k, v))
        intra = torch.matmul(torch.matmul(qb, kb.transpose(-1, -2))
                             * m.diagonal_decay[:, lo:hi, :size, :size], vb)
        inter = torch.matmul(qb * m.query_decay[lo:hi, :size], state)
        out.append(inter + intra)
        state = state * torch.exp(-slope * size) + torch.matmul(
            (kb * m.key_decay[lo:hi, -size:]).transpose(-1, -2), vb)
    return torch.cat(out, dim=-2)


def lightning_forward(m: nn.Module, x: torch.Tensor, index, split: HeadSplit):
    """MiniMax's linear layers: q, k, v per head (after the projection's activation) to this
    rank's heads, the lightning recurrence, back; RMSNorm over all heads, the output gate and
    projection on the local rows. Returns (output, None) like the module (no cache)."""
    b, s = x.shape[:2]
    heads, d = m.num_attention_heads, m.head_dim
    qkv = m.act_fn(m.qkv_proj(x)).reshape(b, s, heads, 3 * d)
    lo, hi = split.q[index.rank]

    def run(seq):  # (rows, L, n, 3 d): one batch
        q, k, v = (t.transpose(1, 2) for t in seq.split(d, -1))
        return _lightning(m, q, k, v, lo, hi).transpose(1, 2)  # (rows, L, n, d)

    out = index.per_batch(run, _gather_heads(qkv, split.q, index))
    out = _scatter_heads(out, split.q, index).reshape(b, s, heads * d)
    out = F.sigmoid(m.output_gate(x)) * m.norm(out)
    return m.out_proj(out), None


def _lightning_split(m, world: int) -> Optional[HeadSplit]:
    heads = int(m.num_attention_heads)
    return split_heads(heads, heads, world) if heads >= world else None


def _lightning_sent(m, split: HeadSplit, rank: int, local: int) -> int:
    return _sent(split, rank, local, {"q": 3 * m.head_dim, "out": m.head_dim})


# ------------------------------------------------------------------ Mamba2

def _mamba2_projections(m, x):
    return m.in_proj(x)


def _falcon_h1_projections(m, x):  # muP multipliers around the projection
    return m.in_proj(x * m.ssm_in_multiplier) * m.mup_vector


def _gated_norm(m, y, gate):
    return m.norm(y, gate)


def _falcon_h1_gate(m, y, gate):  # the gated norm is optional (config.mamba_rms_norm)
    return m.norm(y, gate) if m.mamba_rms_norm else y * F.silu(gate)


@dataclass(frozen=True)
class Mamba2Parts:
    """Where a Mamba2 family keeps its pieces (all: ``in_proj`` -> [gate, x B C, dt], the
    convolution over x B C, ``mamba2_chunk_scan``, a gate with the output, ``out_proj``)."""

    project: Callable = _mamba2_projections
    gate: Callable = _gated_norm


def mamba2_forward(m: nn.Module, x: torch.Tensor, index, split: HeadSplit) -> torch.Tensor:
    """(b, s/P, D) local rows in layout order -> the mixer's output for them (b, s/P, D); the
    units of ``split`` are heads (``q``) and the groups their B, C come from (``kv``)."""
    parts, kernels = _family(m).parts, sys.modules[type(m).__module__]
    b, s = x.shape[:2]
    heads, p, groups, n_state = m.num_heads, m.head_dim, m.n_groups, m.ssm_state_size
    gate, xbc, dt = parts.project(m, x).split([m.intermediate_size, m.conv_dim, heads], -1)
    xs, bs, cs = xbc.split([heads * p, groups * n_state, groups * n_state], -1)
    per_head = torch.cat([xs.reshape(b, s, heads, p), dt.unsqueeze(-1)], -1)
    per_group = torch.cat([bs.reshape(b, s, groups, n_state), cs.reshape(b, s, groups, n_state)], -1)
    (hlo, hhi), (glo, ghi) = split.q[index.rank], split.kv[index.rank]
    ng = ghi - glo
    x_at, bc_at = heads * p, heads * p + groups * n_state
    head_group = split.kv_index(index.rank)
    conv = _conv(m, kernels, [slice(hlo * p, hhi * p), slice(x_at + glo * n_state, x_at + ghi * n_state),
                              slice(bc_at + glo * n_state, bc_at + ghi * n_state)])

    def run(xh, bc):  # (rows, L, nh, p + 1), (rows, L, ng, 2 n_state): one batch
        rows, length, nh = xh.shape[:3]
        mixed = conv(torch.cat([xh[..., :p].flatten(2), bc[..., :n_state].flatten(2),
                                bc[..., n_state:].flatten(2)], -1))
        xm, bm, cm = mixed.split([nh * p, ng * n_state, ng * n_state], -1)
        bm, cm = bm.reshape(rows, length, ng, n_state), cm.reshape(rows, length, ng, n_state)
        if head_group is not None:  # this rank's heads do not split its groups evenly: B, C per head
            # (slices, not an index tensor: no host-to-device copy in the layer)
            bm, cm = (torch.cat([t[:, :, g:g + 1] for g in head_group], 2) for t in (bm, cm))
        y = kernels.mamba2_chunk_scan(
            xm.reshape(rows, length, nh, p), xh[..., p], -torch.exp(m.A_log[hlo:hhi].float()), bm, cm,
            chunk_size=m.chunk_size, D=m.D[hlo:hhi], z=None, dt_bias=m.dt_bias[hlo:hhi],
            dt_softplus=True, dt_limit=m.time_step_limit)
        return y.reshape(rows, length, nh, p)

    y = index.per_batch(run, _gather_heads(per_head, split.q, index), _gather_heads(per_group, split.kv, index))
    y = _scatter_heads(y, split.q, index).reshape(b, s, heads * p)
    return m.out_proj(parts.gate(m, y, gate).to(x.dtype))


def _mamba2_split(m, world: int) -> Optional[HeadSplit]:
    return split_heads(int(m.num_heads), int(m.n_groups), world) if m.num_heads >= world else None


def _mamba2_sent(m, split: HeadSplit, rank: int, local: int) -> int:
    return _sent(split, rank, local, {"q": m.head_dim + 1, "kv": 2 * m.ssm_state_size,
                                      "out": m.head_dim})


# ------------------------------------------------------------------ Mamba (channel-parallel)

def mamba_forward(m: nn.Module, x: torch.Tensor, index, split: HeadSplit) -> torch.Tensor:
    """Jamba's Mamba, channel-parallel: every channel of the selective scan has its own state,
    but its dt, B and C are projected (``x_proj``) from all channels of a token after the
    convolution. So the convolution's input travels per channel to this rank's channels
    (``split.q``: channel ranges), each rank projects its channels' share of ``x_proj`` and
    one sum over ranks (``comm.sum_over_ranks``: (R + 2N) values per token, R = dt rank, N =
    state) completes it on every rank; dt's per-channel projection, the scan and the D skip run
    on this rank's channels, the gate and ``out_proj`` on the local rows after the inverse
    all-to-all."""
    kernels = sys.modules[type(m).__module__]
    lo, hi = split.q[index.rank]
    xs, gate = m.in_proj(x).chunk(2, dim=-1)  # (b, s/P, c) each, as the module splits them
    xs = _gather_heads(xs.unsqueeze(-1), split.q, index).squeeze(-1)  # natural order, n channels
    xs = index.per_batch(_conv(m, kernels, [slice(lo, hi)]), xs)
    # summed over the S real tokens (not the documents' padding), then laid out again
    projected = index.natural(sum_over_ranks(
        index.rank_major(F.linear(xs, m.x_proj.weight[:, lo:hi])), index.group))
    bias = None if m.dt_proj.bias is None else m.dt_proj.bias[lo:hi].float()

    def run(xs, projected):  # (rows, L, n), (rows, L, R + 2 N): one batch
        time_step, b_ssm, c_ssm = projected.split([m.time_step_rank, m.ssm_state_size, m.ssm_state_size], -1)
        time_step = m.dt_proj.weight[lo:hi] @ m.dt_layernorm(time_step).transpose(1, 2)  # (rows, n, L)
        y = kernels.mamba_selective_scan(
            xs.transpose(1, 2), time_step, -torch.exp(m.A_log[lo:hi].float()),
            m.b_layernorm(b_ssm).transpose(1, 2), m.c_layernorm(c_ssm).transpose(1, 2),
            D=m.D[lo:hi].float(), z=None, delta_bias=bias, delta_softplus=True,
            use_mambapy=m.use_mambapy, use_associative_scan=m.use_associative_scan)
        return y.transpose(1, 2)  # (rows, L, n)

    y = _scatter_heads(index.per_batch(run, xs, projected).unsqueeze(-1), split.q, index).squeeze(-1)
    return m.out_proj((y * F.silu(gate)).to(x.dtype))


def _mamba_split(m, world: int) -> Optional[HeadSplit]:
    channels = int(m.intermediate_size)
    return split_heads(channels, channels, world) if channels >= world else None


def _mamba_sent(m, split: HeadSplit, rank: int, local: int) -> int:
    """The channels' all-to-alls (in the model's dtype; the scan's output comes back in
    float32, counted here as one value) and the ring all-reduce of the (R + 2N)-wide
    projection over every token of the sequence."""
    world = split.size
    reduce = 2 * (world - 1) * local * world * (m.time_step_rank + 2 * m.ssm_state_size) // world
    return _sent(split, rank, local, {"q": 1, "out": 1}) + reduce


# ------------------------------------------------------------------ the table

@dataclass(frozen=True)
class HeadParallel:
    """One family's head-parallel scheme: its ``forward(module, x, index, split)``, the
    ``split(module, world)`` of its heads (None: fewer heads than ranks), the values
    ``sent(module, split, rank, local tokens)`` per layer, and where its pieces are."""

    forward: Callable
    split: Callable
    sent: Callable
    parts: object


_DELTANET = dict(forward=deltanet_forward, split=_deltanet_split, sent=_deltanet_sent)
_MAMBA2 = dict(forward=mamba2_forward, split=_mamba2_split, sent=_mamba2_sent)
_KDA = dict(forward=kda_forward, split=_kda_split, sent=_kda_sent)
_LIGHTNING = dict(forward=lightning_forward, split=_lightning_split, sent=_lightning_sent)
_MAMBA = dict(forward=mamba_forward, split=_mamba_split, sent=_mamba_sent)
HEAD_PARALLEL = {
    "Qwen3NextGatedDeltaNet": HeadParallel(**_DELTANET, parts=DeltaNetParts(_qwen3_next, "norm", "out_proj")),
    "Qwen3_5GatedDeltaNet": HeadParallel(**_DELTANET, parts=DeltaNetParts(_qwen3_5, "norm", "out_proj")),
    "Qwen3_5MoeGatedDeltaNet": HeadParallel(**_DELTANET, parts=DeltaNetParts(_qwen3_5, "norm", "out_proj")),
    "OlmoHybridGatedDeltaNet": HeadParallel(**_DELTANET, parts=DeltaNetParts(
        _olmo_hybrid, "o_norm", "o_proj", lambda m: 2.0 if m.allow_neg_eigval else 1.0)),
    "KimiLinearDeltaAttention": HeadParallel(**_KDA, parts=KDAParts(lambda m, x: m.g_b_proj(m.g_a_proj(x)))),
    "BailingHybridDeltaAttention": HeadParallel(**_KDA, parts=KDAParts(lambda m, x: m.g_proj(x))),
    "MiniMaxLightningAttention": HeadParallel(**_LIGHTNING, parts=None),
    "NemotronHMamba2Mixer": HeadParallel(**_MAMBA2, parts=Mamba2Parts()),
    "GraniteMoeHybridMambaLayer": HeadParallel(**_MAMBA2, parts=Mamba2Parts()),
    "BambaMixer": HeadParallel(**_MAMBA2, parts=Mamba2Parts()),
    "Zamba2MambaMixer": HeadParallel(**_MAMBA2, parts=Mamba2Parts()),
    "JambaMambaMixer": HeadParallel(**_MAMBA, parts=None),
    "FalconH1Mixer": HeadParallel(**_MAMBA2, parts=Mamba2Parts(_falcon_h1_projections, _falcon_h1_gate)),
}


def _family(module: nn.Module) -> HeadParallel:
    return HEAD_PARALLEL[type(module).__name__]


def head_split(module: nn.Module, world: int) -> Optional[HeadSplit]:
    """The split of ``module``'s heads over ``world`` ranks, None where it has too few."""
    return _family(module).split(module, world)


def work_share(module: nn.Module, split: HeadSplit) -> float:
    """The busiest rank's share of the layer's recurrence, times P: 1 for an even split
    (uneven: more). Gated DeltaNet's value-channel slices each repeat their key head's q/k
    work (the chunked kernel's per-head matrices), so its share counts key heads too."""
    units = max(hi - lo for lo, hi in split.q) * split.size / split.heads
    if _family(module).forward is deltanet_forward:
        return max(units, max(hi - lo for lo, hi in split.kv) * split.size / split.kv_heads)
    return units


def head_parallel_forward(module: nn.Module, x: torch.Tensor, index, split: HeadSplit) -> torch.Tensor:
    return _family(module).forward(module, x, index, split)


def bytes_sent(module: nn.Module, seqlen: int, world: int, element_size: int, rank: int = 0) -> int:
    """Bytes ``rank`` sends per layer in forward (its all-to-alls; backward the same), for a
    sequence of ``seqlen`` tokens over ``world`` ranks (a split must exist), every value at
    ``element_size`` (Kimi-Linear's decay and Jamba's scan output travel in float32)."""
    split = head_split(module, world)
    return _family(module).sent(module, split, rank, seqlen // world) * element_size
