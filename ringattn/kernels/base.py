"""The contract every attention kernel backend fulfils.

A backend computes attention of one Q block against one K/V block and returns the
block's output together with its log-sum-exp, so that partial results from different
K/V blocks can be merged exactly (see ``ringattn.merge``). Its backward takes the
*final* (merged) output and log-sum-exp of the whole row, which makes each block's
gradient exact on its own (D = rowsum(dO * O) is a property of the whole row).

Shapes (flash-attn convention, sequence before heads):
    q:    (batch, q_len, heads, head_dim)
    k:    (batch, k_len, kv_heads, head_dim), heads % kv_heads == 0
    v:    (batch, k_len, kv_heads, v_head_dim)
    out:  (batch, q_len, heads, v_head_dim)
    lse:  (batch, heads, q_len), float32 (float64 for float64 inputs)
v's head size may differ from q/k's (MLA: DeepSeek-V3's 192 vs 128). Kernels that need one
head size (flash-attn, PyTorch's CPU flash op) pad with zeros (``pad_head_dims``), which
is exact.

``softcap=c`` (Gemma 2) replaces each scaled score x by c * tanh(x / c) before the softmax.
``window=(left, right)``: a band, bottom-right aligned as in flash-attn: of n queries and m
keys, query i sees key j iff i + (m - n) - left <= j <= i + (m - n) + right (-1 = unbounded).
``segments=(q_bounds, k_bounds)`` (host int tuples, flash-attn's varlen): the block packs
independent sequences; query rows q_bounds[s]:q_bounds[s+1] see only key rows
k_bounds[s]:k_bounds[s+1], with ``window`` aligned to each sequence's own lengths (batch 1);
``cu_seqlens``: the same bounds as int32 tensors on the data's device, made once per plan
(kernels that need device copies make them when it is None).
Feature flags say what a backend can do: ``supports_mask`` (a bool mask per block),
``supports_window``, ``supports_varlen`` and ``supports_softcap``. Attention sinks need no
kernel support: they are one more term in the merge (``ringattn.merge``), applied once per
row after every block is merged.

``causal=True`` means top-left aligned: query i sees keys j <= i. Layouts only ask for
causal on blocks whose query and key index sets line up that way (see ``ringattn.layouts``).
"""
from __future__ import annotations

from typing import Protocol

import torch


class KernelBackend(Protocol):
    name: str
    supports_mask: bool  # accepts ``mask``: bool (q_len, k_len), True = visible
    supports_softcap: bool  # accepts ``softcap``: float, scores -> c * tanh(scores / c)
    supports_window: bool  # accepts ``window``: (left, right), bottom-right aligned band
    supports_varlen: bool  # accepts ``segments``/``cu_seqlens``: packed independent sequences

    def supports(self, q: torch.Tensor) -> str | None:
        """None if this backend can run q's device/dtype/head_dim, else why not."""

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float,
        mask: torch.Tensor | None = None, softcap: float | None = None,
        window: tuple[int, int] | None = None, segments=None, cu_seqlens=None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (out in q.dtype or float32, lse float32)."""

    def backward(
        self,
        dout: torch.Tensor,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        out: torch.Tensor,
        lse: torch.Tensor,
        *,
        causal: bool,
        scale: float,
        mask: torch.Tensor | None = None,
        softcap: float | None = None,
        window: tuple[int, int] | None = None,
        segments=None,
        cu_seqlens=None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> (dq, dk, dv) shaped like q, k, v (k/v summed over their query-head group)."""


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for 16-bit inputs (never accumulate in bf16/fp16); fp64 stays fp64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """(b, s, kv_heads, d) -> (b, s, kv_heads * groups, d); query head h uses kv head h // groups."""
    return x if groups == 1 else x.repeat_interleave(groups, dim=2)


def sum_kv_groups(dx: torch.Tensor, groups: int) -> torch.Tensor:
    """Inverse of repeat_kv for gradients: (b, s, kv_heads * groups, d) -> (b, s, kv_heads, d)."""
    if groups == 1:
        return dx
    b, s, h, d = dx.shape
    return dx.view(b, s, h // groups, groups, d).sum(dim=3)


def cuda_problem(kernel: str, device, dtype, supported, generation: str) -> str | None:
    """Why ``kernel`` (a flash-style CUDA kernel: fp16/bf16 only) cannot run on CUDA
    ``device`` in ``dtype``, or None; ``supported(major)`` judges the compute capability,
    ``generation`` names what it needs."""
    if dtype not in (torch.float16, torch.bfloat16):
        return f"{kernel} needs fp16/bf16, got {dtype}"
    major, minor = torch.cuda.get_device_capability(device)
    if not supported(major):
        return f"{kernel} needs {generation}; {device} is sm{major}{minor}"
    return None


def pad_head_dims(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """(q, k, v) zero-padded along head_dim to one size, max(q/k's, v's), for kernels that
    take one head size -> (q, k, v, head_dim, v_head_dim) with the original sizes. Exact:
    zero columns of q and k add 0 to every score (the caller's scale is explicit), and zero
    columns of v give zero output columns, sliced off (``out[..., :v_head_dim]``); in
    backward dout and out are padded alike and the gradients sliced back."""
    d, dv = q.shape[-1], v.shape[-1]
    if d == dv:
        return q, k, v, d, dv
    if d > dv:
        return q, k, torch.nn.functional.pad(v, (0, d - dv)), d, dv
    pad = (0, dv - d)
    return torch.nn.functional.pad(q, pad), torch.nn.functional.pad(k, pad), v, d, dv


def pad_to(x: torch.Tensor, size: int) -> torch.Tensor:
    """x zero-padded along its last dim to ``size`` (no copy when it already is)."""
    return x if x.shape[-1] == size else torch.nn.functional.pad(x, (0, size - x.shape[-1]))


def forward_one_head_size(forward, q, k, v, **kwargs):
    """``forward(q, k, v, **kwargs)`` of a kernel that takes one head size, for MLA's unequal
    q/k and v sizes: padded (``pad_head_dims``), called, out sliced back (exact)."""
    q, k, v, _, dv = pad_head_dims(q, k, v)
    out, lse = forward(q, k, v, **kwargs)
    return out[..., :dv], lse


def backward_one_head_size(backward, dout, q, k, v, out, lse, **kwargs):
    """The backward of ``forward_one_head_size``: dout and out padded like v, the
    gradients sliced back."""
    q, k, v, d, dv = pad_head_dims(q, k, v)
    size = q.shape[-1]
    dq, dk, dv_ = backward(pad_to(dout, size), q, k, v, pad_to(out, size), lse, **kwargs)
    return dq[..., :d], dk[..., :d], dv_[..., :dv]


def band(n: int, m: int, window: tuple[int, int], device, rows: slice | None = None,
         cols: slice | None = None) -> torch.Tensor:
    """bool (rows, cols) of the n x m block: the bottom-right aligned ``window`` band
    (True = visible); ``rows``/``cols`` cut a tile out of it without building the rest."""
    rows = rows or slice(0, n)
    cols = cols or slice(0, m)
    i = torch.arange(rows.start, rows.stop, device=device)[:, None] + (m - n)
    j = torch.arange(cols.start, cols.stop, device=device)[None, :]
    left, right = window
    ok = torch.ones(len(range(rows.start, rows.stop)), len(range(cols.start, cols.stop)),
                    dtype=torch.bool, device=device)
    if left >= 0:
        ok &= j >= i - left
    if right >= 0:
        ok &= j <= i + right
    return ok


def segment_bounds(segments) -> list[tuple[slice, slice]]:
    """(q_bounds, k_bounds) -> [(query rows, key rows)] of each packed sequence."""
    qb, kb = segments
    return [(slice(qb[s], qb[s + 1]), slice(kb[s], kb[s + 1])) for s in range(len(qb) - 1)]


def forward_segments(forward, q, k, v, segments, **kwargs):
    """Varlen forward as one ``forward`` call per packed sequence (segments partition both
    the query and the key rows) -> (out, lse) of the whole block. A sequence with no keys
    gets out 0 and lse -inf; one with no queries adds nothing."""
    b, _, h, _ = q.shape
    acc = accumulation_dtype(q.dtype)
    parts = []
    for rq, rk in segment_bounds(segments):
        n = rq.stop - rq.start
        if n == 0:
            continue
        if rk.stop == rk.start:
            parts.append((torch.zeros(b, n, h, v.shape[-1], dtype=acc, device=q.device),
                          torch.full((b, h, n), float("-inf"), dtype=acc, device=q.device)))
            continue
        parts.append(forward(q[:, rq], k[:, rk], v[:, rk], **kwargs))
    return (torch.cat([o.to(acc) for o, _ in parts], 1),
            torch.cat([lse.to(acc) for _, lse in parts], 2))


def backward_segments(backward, dout, q, k, v, out, lse, segments, **kwargs):
    """Varlen backward as one ``backward`` call per packed sequence -> (dq, dk, dv); rows
    with no keys and keys with no rows get zero gradients."""
    acc = accumulation_dtype(q.dtype)
    dq = torch.zeros(q.shape, dtype=acc, device=q.device)
    dk = torch.zeros(k.shape, dtype=acc, device=q.device)
    dv = torch.zeros(v.shape, dtype=acc, device=q.device)
    for rq, rk in segment_bounds(segments):
        if rq.stop == rq.start or rk.stop == rk.start:
            continue
        g = backward(dout[:, rq], q[:, rq], k[:, rk], v[:, rk], out[:, rq], lse[:, :, rq], **kwargs)
        dq[:, rq], dk[:, rk], dv[:, rk] = g[0], g[1], g[2]
    return dq, dk, dv


def block_as_band(causal, window, n, m):
    """(window or None, keys used) of an n x m block: a top-left causal block as the
    bottom-right band (-1, n - m) when n >= m, else the first n keys' triangle (-1, 0) (keys
    n.. are hidden from every row); anything else as it is."""
    if not causal:
        return window, m
    assert window is None, "a block is causal or has a window, not both"
    if n >= m:
        return (-1, n - m), m
    return (-1, 0), n  # keys n.. are hidden from every row


def cu_seqlens_tensors(segments, cu_seqlens, device):
    """``cu_seqlens`` if given, else int32 tensors of the ``segments`` bounds on ``device``."""
    if cu_seqlens is not None:
        return cu_seqlens
    return tuple(torch.tensor(b, dtype=torch.int32, device=device) for b in segments)


def flatten_batch(x):
    """(b, s, ...) -> (1, b * s, ...): a batch as packed sequences."""
    return x.reshape(1, -1, *x.shape[2:])


def dense_as_varlen_forward(call, q, k, v, causal, window):
    """A dense block (b, n) x (b, m) through one varlen kernel call: the batch as b packed
    sequences of the block's band (``block_as_band``; keys no row sees are not sent).
    ``call(q, k, v, window, segments, cu_seqlens)`` on (1, b * n, h, d) -> (out, lse (1, h,
    b * n)). Returns out (b, n, h, dv) and lse (b, h, n)."""
    b, n, h, _ = q.shape
    window, keys = block_as_band(causal, window, n, k.shape[1])
    segments, cu_seqlens = batch_as_sequences(b, n, keys, q.device)
    out, lse = call(flatten_batch(q), flatten_batch(k[:, :keys]), flatten_batch(v[:, :keys]), window,
                    segments, cu_seqlens)
    return out.view(q.shape[:3] + out.shape[3:]), lse.view(h, b, n).transpose(0, 1)


def dense_as_varlen_backward(call, dout, q, k, v, out, lse, causal, window):
    """The backward of ``dense_as_varlen_forward``: ``call(dout, q, k, v, out, lse, window,
    segments, cu_seqlens)`` on the packed batch -> (dq, dk, dv); keys no row saw get zero."""
    b, n, h, _ = q.shape
    window, keys = block_as_band(causal, window, n, k.shape[1])
    segments, cu_seqlens = batch_as_sequences(b, n, keys, q.device)
    dq, dk_used, dv_used = call(flatten_batch(dout), flatten_batch(q), flatten_batch(k[:, :keys]),
                                flatten_batch(v[:, :keys]), flatten_batch(out),
                                lse.transpose(0, 1).reshape(1, h, b * n), window, segments, cu_seqlens)
    dk, dv = torch.zeros_like(k), torch.zeros_like(v)
    dk[:, :keys] = dk_used.view(b, keys, *k.shape[2:])
    dv[:, :keys] = dv_used.view(b, keys, *v.shape[2:])
    return dq.view(q.shape), dk, dv


def batch_as_sequences(b, n, m, device):
    """Segments and cu_seqlens of b sequences of n queries and m keys each; the bounds are
    made on ``device`` (arange: no host-to-device copy)."""
    segments = tuple(tuple(s * i for i in range(b + 1)) for s in (n, m))
    cu = tuple(torch.arange(b + 1, dtype=torch.int32, device=device) * s for s in (n, m))
    return segments, cu
