"""Decode attention over a KV cache sharded across a process group (tree attention).

Each rank attends the new queries to its own part of the cache with a kernel -> (out_r,
lse_r); the exact result over the union of all parts is then

    M = max_r lse_r,   w_r = exp(lse_r - M),   out = sum_r w_r out_r / sum_r w_r,
    lse = M + log(sum_r w_r)

which takes two all-reduces whatever the cache length: MAX of the (b, h, t) lse, then
SUM of (out_r w_r, w_r) packed into one (b, t, h, head_dim + 1) fp32 tensor. Subtracting
the global max keeps every exp(.) <= 1, so nothing overflows; the combine is in fp32
(fp64 for fp64 inputs) and cast once at the end.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist

from . import profile
from .comm import group_size
from .kernels import get_backend
from .kernels.base import accumulation_dtype
from .merge import add_sinks


def _check(q, k_cache, v_cache):
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if t.dim() != 4:
            raise ValueError(f"decode_attention: {name} must have 4 dims (batch, seqlen, heads, "
                             f"head_dim); got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise ValueError(f"decode_attention: {name} must be floating point; got {t.dtype}")
    if k_cache.shape[:3] != v_cache.shape[:3]:  # only the head sizes may differ (MLA)
        raise ValueError(f"decode_attention: k_cache and v_cache differ in batch, length or "
                         f"kv_heads: {tuple(k_cache.shape)} vs {tuple(v_cache.shape)}")
    if not (q.dtype == k_cache.dtype == v_cache.dtype):
        raise ValueError(f"decode_attention: q, k_cache, v_cache dtypes differ: {q.dtype}, "
                         f"{k_cache.dtype}, {v_cache.dtype}")
    if not (q.device == k_cache.device == v_cache.device):
        raise ValueError(f"decode_attention: q and the cache are on different devices: "
                         f"{q.device}, {k_cache.device}")
    b, t, h, d = q.shape
    if k_cache.shape[0] != b or k_cache.shape[3] != d:
        raise ValueError(f"decode_attention: q {tuple(q.shape)} and k_cache {tuple(k_cache.shape)} "
                         f"differ in batch or head_dim")
    if h % k_cache.shape[2]:
        raise ValueError(f"decode_attention: heads ({h}) must be a multiple of the cache's "
                         f"kv_heads ({k_cache.shape[2]})")
    if t == 0:
        raise ValueError("decode_attention: q has no query tokens (t = 0)")


def check_replicated(q: torch.Tensor, kv_heads: int, group=None) -> None:
    """ValueError unless every rank of ``group`` holds the same q (shape, kv_heads and a
    fp64 fingerprint). One small all-gather: a debug check, not for every step."""
    if group_size(group) == 1:
        return
    device = q.device if dist.get_backend(group) != "gloo" else torch.device("cpu")
    qd = q.detach().to(torch.float64).flatten()
    weights = torch.arange(1, qd.numel() + 1, dtype=torch.float64, device=qd.device)
    mine = torch.tensor([*q.shape, kv_heads, float(qd.sum()), float((qd * weights.reciprocal()).sum())],
                        dtype=torch.float64, device=device)
    every = [torch.empty_like(mine) for _ in range(group_size(group))]
    dist.all_gather(every, mine, group=group)
    rows = [tuple(r.tolist()) for r in every]
    if len({r[:5] for r in rows}) > 1:
        listing = ", ".join(f"rank {i}: {tuple(int(x) for x in r[:5])}" for i, r in enumerate(rows))
        raise ValueError("decode_attention: q shape / kv_heads differ across the group "
                         f"(batch, t, heads, head_dim, kv_heads): {listing}")
    if len({r[5:] for r in rows}) > 1:
        raise ValueError("decode_attention: q differs across the ranks of the group; every rank "
                         "must pass the same new queries (only the cache is sharded)")


def decode_attention(q, k_cache, v_cache, *, group=None, softmax_scale=None, return_lse=False,
                     backend: str = "auto", check_q: bool = False, softcap: float | None = None,
                     sinks: torch.Tensor | None = None, mask=None):
    """Exact attention of the new queries over a KV cache sharded across ``group``.

    q: (batch, t, heads, head_dim), the same on every rank of ``group`` (the caller's
    contract; ``check_q=True`` verifies it with one extra all-gather, for debugging).
    k_cache: (batch, s_r, kv_heads, head_dim), v_cache: (batch, s_r, kv_heads, v_head_dim)
    (MLA: v_head_dim may differ), this rank's part of the cache in any
    order; s_r may differ across ranks and may be 0. There is no mask: every query sees
    every cached key (append the new tokens' K/V to some rank's cache before the call).
    Returns out (batch, t, heads, v_head_dim) in q's dtype, the same on every rank, and with
    ``return_lse`` the fp32 (fp64 for fp64 q) log-sum-exp (batch, heads, t). A query with no
    key anywhere gets out = 0 and lse = -inf. ``softcap``: scores -> c * tanh(scores / c) in
    the kernel (Gemma 2); ``sinks``: (heads,) logits joining every softmax with no value
    (GPT-OSS), folded in once after the combine. Communication: two all-reduces of
    O(batch * t * heads * head_dim), independent of the cache length. Inference only: the
    collectives are not differentiable. ``mask``: refused (a ``RangeMask`` shapes the prefill,
    which runs through ``SequenceParallel.attention(mask=...)``; new tokens see the cache).
    """
    if mask is not None:
        raise ValueError("decode_attention takes no mask: every new query sees every cached key "
                         "(the cache is in any order). Apply a RangeMask (prefix-LM, shared "
                         "prompt) in the prefill through SequenceParallel.attention(mask=...), and "
                         "keep keys a new token must not see out of the cache it attends")
    _check(q, k_cache, v_cache)
    p = group_size(group)
    if check_q:
        check_replicated(q, k_cache.shape[2], group)
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    acc = accumulation_dtype(q.dtype)
    b, t, h, _ = q.shape
    if k_cache.shape[1] > 0:
        kernel = get_backend(backend, q, softcap=softcap)
        out, lse = kernel.forward(q, k_cache, v_cache, causal=False, scale=scale, softcap=softcap)
        out, lse = out.to(acc), lse.to(acc)
    else:
        out = torch.zeros(b, t, h, v_cache.shape[-1], dtype=acc, device=q.device)
        lse = torch.full((b, h, t), float("-inf"), dtype=acc, device=q.device)
    if p > 1:
        out, lse = _combine(out, lse, group)
    if sinks is not None:
        out, lse = add_sinks(out, lse, sinks)
    return (out.to(q.dtype), lse) if return_lse else out.to(q.dtype)


def _combine(out, lse, group):
    """Every rank's (out, lse) over its part -> the exact (out, lse) over all parts."""
    d = out.shape[-1]
    m = lse.clone(memory_format=torch.contiguous_format)  # collectives need dense storage
    with profile.timed("wait_s", out.device):
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
    # m = -inf only where no rank has a key: use 0 there so w = exp(-inf) = 0, not NaN.
    m_safe = torch.where(torch.isneginf(m), torch.zeros_like(m), m)
    w = torch.exp(lse - m_safe).transpose(1, 2).unsqueeze(-1)  # (b, t, h, 1), 0 for empty shards
    packed = torch.cat([out * w, w], dim=-1)
    with profile.timed("wait_s", out.device):
        dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=group)
    prof = profile.active()
    if prof is not None:  # this rank's contribution to the two all-reduces
        prof.bytes_sent += m.numel() * m.element_size() + packed.numel() * packed.element_size()
    num, den = packed[..., :d], packed[..., d:]
    out = torch.where(den > 0, num / den.clamp_min(torch.finfo(den.dtype).tiny), torch.zeros_like(num))
    return out, m_safe + torch.log(den.squeeze(-1).transpose(1, 2))
