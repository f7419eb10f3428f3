"""How many times the planner's block tasks compute each query-key pair, rendered the way
flash-attn runs them, from flash-attn's source rather than from ringattn's helpers:
csrc/flash_attn/flash_api.cpp (mha_fwd / mha_varlen_fwd: a window side >= seqlen_k, varlen
max_seqlen_k, becomes -1; set_params_fprop: a one-sided window's open side becomes
seqlen_k) and src/mask.h (key j visible from query i iff
i + s_k - s_q - left <= j < i + 1 + s_k - s_q + right, per varlen sequence), flash-attn 2.6.3
and 2.8.3 alike. Our single-block convention ``causal=True`` is top-left (the flash adapter
sends it as a square or a bottom-right band).
"""
from __future__ import annotations

import torch


def flash_rule(n, m, window, causal, max_k=None):
    """bool (n, m): what flash-attn 2.6/2.8 computes for one sequence of n queries and m
    keys with ``window`` (or top-left ``causal`` as our plain blocks mean it); ``max_k``:
    the call's max_seqlen_k under varlen (the clamp and the open side use it)."""
    max_k = m if max_k is None else max_k
    i = torch.arange(n)[:, None]
    j = torch.arange(m)[None, :]
    if causal:  # our top-left causal block; the flash adapter sends squares only here
        return j <= i
    left, right = window if window is not None else (-1, -1)
    # mha_fwd: a side >= seqlen_k is unbounded
    if left >= max_k:
        left = -1
    if right >= max_k:
        right = -1
    # set_params_fprop: a one-sided window's open side becomes seqlen_k
    if left < 0 and right >= 0:
        left = max_k
    if left >= 0 and right < 0:
        right = max_k
    if left < 0 and right < 0:
        return torch.ones(n, m, dtype=torch.bool)
    # mask.h: key j visible iff i + m - n - left <= j < i + 1 + m - n + right
    return (j >= i + m - n - left) & (j < i + 1 + m - n + right)


def render_tasks(tasks, n_q, n_k):
    """int (n_q, n_k): how often the tasks compute each pair, as flash-attn would."""
    count = torch.zeros(n_q, n_k, dtype=torch.int64)
    for t in tasks:
        r0, c0 = t.q_rows.start or 0, t.k_rows.start or 0
        r1 = n_q if t.q_rows.stop is None else t.q_rows.stop
        c1 = n_k if t.k_rows.stop is None else t.k_rows.stop
        if t.mask is not None:
            count[r0:r1, c0:c1] += t.mask.long()
            continue
        if t.segments is None:
            count[r0:r1, c0:c1] += flash_rule(r1 - r0, c1 - c0, t.window, t.causal).long()
            continue
        qb, kb = t.segments
        assert qb[0] == kb[0] == 0 and qb[-1] == r1 - r0 and kb[-1] == c1 - c0
        assert all(b >= a for a, b in zip(qb, qb[1:])) and all(b >= a for a, b in zip(kb, kb[1:]))
        max_k = max(b - a for a, b in zip(kb, kb[1:]))
        for s in range(len(qb) - 1):
            n, m = qb[s + 1] - qb[s], kb[s + 1] - kb[s]
            if n and m:
                count[r0 + qb[s]:r0 + qb[s + 1], c0 + kb[s]:c0 + kb[s + 1]] += flash_rule(
                    n, m, t.window, False, max_k).long()
    return count
