"""Exact attention diagnostics inside the SP group, without any (n x n) matrix.

For chosen query positions, each rank scores the queries against its own keys only
((queries x local keys) per head), and turns scores into probabilities with the *final*
log-sum-exp of each query row over every rank's keys: p = exp(s - L). So every rank's
share of a row is exact on its own, and sums of p over key spans, top-k positions and
mass per query-key distance combine with a fixed number of small collectives.
Computed in float64 (the queries are few; keys are upcast one shard at a time).

What the numbers mean: where a head's softmax puts its weight. They are evidence about
what the model reads, not an explanation of why it answers (values, later layers and the
MLPs all intervene).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .comm import group_size


@dataclass
class AttentionMass:
    """span_mass: (batch, heads, n_queries, n_spans) softmax mass on each key span;
    top_positions / top_probs: (batch, heads, n_queries, top_k) the most attended key
    positions (global) and their probabilities, largest first (position -1, probability 0
    where a query sees fewer than top_k keys); distance_mass: (heads,
    n_buckets) mass in each query-key distance bucket, averaged over batch and queries;
    distance_edges: bucket i holds distances in [edges[i], edges[i+1]). Masses and
    probabilities are float64 (computed so: the queries are few), positions int64; the same
    on every rank of the group."""

    span_mass: torch.Tensor
    top_positions: torch.Tensor
    top_probs: torch.Tensor
    distance_mass: torch.Tensor
    distance_edges: list[int]


def log_buckets(max_distance: int) -> list[int]:
    """Edges [0, 1, 2, 4, ..., 2^k] with 2^k > max_distance: distance 0 (the token itself),
    then one bucket per octave."""
    edges, e = [0, 1], 1
    while e <= max_distance:
        e *= 2
        edges.append(e)
    return edges


def _all_reduce(t, op, group):
    if group_size(group) > 1:
        dist.all_reduce(t, op=op, group=group)
    return t


def _gather_queries(q, positions, query_positions, group):
    """The q rows at global ``query_positions`` from whichever rank holds them -> (b, nq, h, d)
    fp64 on every rank (one all-reduce; exactly one rank contributes each row)."""
    hit = (positions[None, :] == query_positions[:, None]).to(torch.float64)  # (nq, s_local)
    rows = torch.einsum("ns,bshd->bnhd", hit, q.to(torch.float64))
    packed = torch.cat([rows.flatten(), hit.sum(1)])
    _all_reduce(packed, dist.ReduceOp.SUM, group)
    counts = packed[rows.numel():]
    if not torch.all(counts == 1):
        missing = query_positions[counts != 1].tolist()
        raise ValueError(f"attention_mass: query positions {missing} are not held by exactly one "
                         "rank (out of range of the sequence?)")
    return packed[:rows.numel()].view(rows.shape)


def attention_mass(q, k, positions, query_positions, *, spans=(), top_k: int = 0,
                   distance_buckets: list[int] | None = None, causal: bool = True, group=None,
                   softmax_scale=None, softcap: float | None = None,
                   sinks: torch.Tensor | None = None, mask=None) -> AttentionMass:
    """Attention mass of chosen queries of one layer, exact, inside the SP group.

    q: (batch, s_local, heads, head_dim), k: (batch, s_local, kv_heads, head_dim): this rank's
    shard (RoPE applied), any layout; positions: (s_local,) their global positions (e.g.
    ``sp.positions(n)``). query_positions: global positions of the queries to inspect (the
    same list on every rank). spans: [(start, stop), ...] global key ranges. top_k: how many
    most attended positions to report (0: none). distance_buckets: edges for the distance
    histogram (default ``log_buckets(n)``). causal: query i sees keys j <= i. softcap /
    sinks (heads,): as the model's attention uses them (a sink takes mass no key gets).
    mask: the ``RangeMask`` the model's attention used (then the whole rule: causal=False);
    a query it hides entirely has no mass anywhere (all zeros).
    Communication: four all-reduces and one all-gather, none of which grows with s_local.
    Memory: (queries x s_local) per head.
    """
    if q.dim() != 4 or k.dim() != 4 or q.shape[0] != k.shape[0] or q.shape[1] != k.shape[1]:
        raise ValueError(f"attention_mass: q {tuple(q.shape)} and k {tuple(k.shape)} must be "
                         "(batch, s_local, heads, head_dim) shards of the same tokens")
    if q.shape[2] % k.shape[2] or q.shape[3] != k.shape[3]:
        raise ValueError(f"attention_mass: heads {q.shape[2]} must be a multiple of kv_heads "
                         f"{k.shape[2]} and head_dims equal")
    if positions.shape != (q.shape[1],):
        raise ValueError(f"attention_mass: positions must be ({q.shape[1]},); got {tuple(positions.shape)}")
    device = q.device
    qpos = torch.as_tensor(query_positions, dtype=torch.long, device=device).flatten()
    if qpos.numel() == 0:
        raise ValueError("attention_mass: no query positions")
    positions = positions.to(device)
    n = q.shape[1] * group_size(group)  # every layout gives each rank an equal shard
    edges = distance_buckets if distance_buckets is not None else log_buckets(n)
    if list(edges) != sorted(edges) or len(edges) < 2 or edges[0] != 0:
        raise ValueError(f"attention_mass: distance_buckets must increase from 0; got {edges}")
    b, s, h, d = q.shape
    g = h // k.shape[2]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(d)

    qsel = _gather_queries(q, positions, qpos, group)  # (b, nq, h, d)
    kk = k.to(torch.float64).repeat_interleave(g, dim=2)
    scores = torch.einsum("bnhd,bshd->bhns", qsel, kk) * scale  # (b, h, nq, s_local)
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    if mask is not None:
        if causal:
            raise ValueError("attention_mass: mask= (a RangeMask) is the whole rule; pass causal=False")
        order = torch.argsort(qpos).cpu()  # the mask takes increasing positions
        seen = mask.dense(qpos.cpu()[order], positions.cpu())[torch.argsort(order)]
        scores = scores.masked_fill(~seen.to(device), float("-inf"))
    if causal:
        scores = scores.masked_fill(positions[None, :] > qpos[:, None], float("-inf"))
    # the final lse of each row over every rank's keys: max, then sum of exp(. - max)
    local = torch.logsumexp(scores, dim=-1)
    m = _all_reduce(local.clone(), dist.ReduceOp.MAX, group)
    m = torch.where(torch.isneginf(m), torch.zeros_like(m), m)
    total = _all_reduce(torch.exp(local - m), dist.ReduceOp.SUM, group)
    lse = m + torch.log(total)
    if sinks is not None:
        lse = torch.logaddexp(lse, sinks.detach().to(lse).view(1, -1, 1))
    p = torch.exp(scores - lse[..., None])  # exact probabilities of this rank's keys
    p = p.masked_fill(torch.isneginf(lse)[..., None], 0.0)  # a query that sees nothing

    in_span = torch.stack([(positions >= lo) & (positions < hi) for lo, hi in spans], dim=1) \
        if len(spans) else torch.zeros(s, 0, dtype=torch.bool, device=device)
    span_mass = torch.einsum("bhns,sk->bhnk", p, in_span.to(p.dtype))
    dist_q = (qpos[:, None] - positions[None, :]).abs()  # (nq, s_local)
    bucket = torch.bucketize(dist_q, torch.tensor(edges, device=device), right=True) - 1
    bucket = bucket.clamp(0, len(edges) - 2)
    onehot = torch.nn.functional.one_hot(bucket, len(edges) - 1).to(p.dtype)  # (nq, s, nb)
    by_distance = torch.einsum("bhns,nsk->hk", p, onehot) / (b * qpos.numel())
    packed = _all_reduce(torch.cat([span_mass.flatten(), by_distance.flatten()]), dist.ReduceOp.SUM, group)
    span_mass = packed[:span_mass.numel()].view(span_mass.shape)
    by_distance = packed[span_mass.numel():].view(by_distance.shape)

    top_pos = torch.zeros(b, h, qpos.numel(), 0, dtype=torch.long, device=device)
    top_p = torch.zeros(b, h, qpos.numel(), 0, dtype=p.dtype, device=device)
    if top_k > 0:
        # candidates: this rank's top_k (hidden keys and padding at -1), then the global top_k
        kk_ = min(top_k, s)
        visible = p.masked_fill(torch.isneginf(scores), -1.0)
        vals, idx = visible.topk(kk_, dim=-1)
        cand = torch.full((2, b, h, qpos.numel(), top_k), -1.0, dtype=p.dtype, device=device)
        cand[0, ..., :kk_], cand[1, ..., :kk_] = vals, positions[idx].to(p.dtype)
        if group_size(group) > 1:
            every = [torch.empty_like(cand) for _ in range(group_size(group))]
            dist.all_gather(every, cand, group=group)
            cand = torch.cat(every, dim=-1)
        top_p, order = cand[0].topk(top_k, dim=-1)
        top_pos = cand[1].gather(-1, order).long()
        top_pos = torch.where(top_p < 0, torch.full_like(top_pos, -1), top_pos)
        top_p = top_p.clamp_min(0.0)
    return AttentionMass(span_mass, top_pos, top_p, by_distance, list(edges))
