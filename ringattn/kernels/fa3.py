"""FlashAttention-3 (flash-attention's hopper/ package, module ``flash_attn_interface``), Hopper.

ringattn calls its internal entry points ``_flash_attn_forward`` / ``_flash_attn_backward``
(custom ops ``flash_attn_3::...``): the public ``flash_attn_varlen_func`` has no block backward
taking the merged row's out/lse. Every block is one varlen call (a dense block its batch as
sequences; a top-left causal block the band (-1, n - m), or the first n keys' triangle): FA3's
lse is (heads, total_q) there, as flash-attn 2's varlen.

FA3's window rule (hopper/flash_api.cpp mha_fwd / mha_bwd) differs from flash-attn 2's: a side
>= max_seqlen - 1 becomes -1 and set_params then opens it to max_seqlen_k - 1 (left) or
max_seqlen_q - 1 (right), never to seqlen_k; with max lengths >= every sequence's own neither
step changes which keys a row sees (hopper/mask.h aligns bottom-right on the actual lengths),
so bands are passed as they are with the exact max lengths. Empty rows: out 0 and lse -inf
(a sequence with no keys at all: lse +inf); the merge ignores both. Native GQA and softcap; a
V head dim of its own for Q/K in (128, 192] with V in (96, 128] (DeepSeek MLA's 192/128), or
Q/K <= 64; fp16/bf16 on sm90.
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import sys

import torch

from .base import cu_seqlens_tensors, cuda_problem, dense_as_varlen_backward, dense_as_varlen_forward, segment_bounds

MODULE = "flash_attn_interface"


def _fa3():
    try:
        return importlib.import_module(MODULE)
    except ImportError as e:  # pragma: no cover - depends on the installation
        raise ImportError("backend='fa3' needs FlashAttention-3 (flash-attention's hopper/ "
                          "package, module flash_attn_interface), built for your CUDA and torch") from e


@functools.lru_cache(maxsize=None)
def _installed() -> bool:
    """Whether flash_attn_interface can be imported; looked up once (auto asks per call)."""
    return importlib.util.find_spec(MODULE) is not None


def kernel_device_types() -> tuple[str, ...]:
    """CUDA, unless a loaded ``flash_attn_interface`` says otherwise in ``device_types`` (the
    test suite's CPU stand-in says ("cpu",); the real module has no such attribute)."""
    module = sys.modules.get(MODULE)
    return tuple(getattr(module, "device_types", ("cuda",))) if module is not None else ("cuda",)


def v_head_dim_problem(head_dim: int, v_head_dim: int) -> str | None:
    """hopper/flash_api.cpp mha_fwd's rule for a V head dim unlike Q/K's."""
    if v_head_dim == head_dim or (128 < head_dim <= 192 and 96 < v_head_dim <= 128) or \
            (head_dim <= 64 and v_head_dim <= 512):
        return None
    return (f"FA3 takes a V head dim of its own only for Q/K in (128, 192] with V in (96, 128], "
            f"or Q/K <= 64 (got {head_dim}/{v_head_dim})")


def _max_lengths(segments) -> tuple[int, int]:
    spans = segment_bounds(segments)
    return (max(rq.stop - rq.start for rq, _ in spans), max(rk.stop - rk.start for _, rk in spans))


class Fa3Backend:
    name = "fa3"
    supports_mask = False
    supports_softcap = True
    supports_window = True
    supports_varlen = True

    def device_problem(self, device: torch.device, dtype: torch.dtype, head_dim: int,
                       v_head_dim: int | None = None) -> str | None:
        if device.type not in kernel_device_types():
            return "FA3 runs on CUDA only"
        if device.type == "cuda":
            problem = cuda_problem("FA3 (training)", device, dtype, lambda major: major == 9,
                                   "a Hopper (sm90) GPU, which it is built for")
            if problem:
                return problem
        if head_dim > 256 or head_dim % 8:
            return f"FA3 needs head_dim <= 256 and a multiple of 8, got {head_dim}"
        if v_head_dim is not None and v_head_dim_problem(head_dim, v_head_dim):
            return v_head_dim_problem(head_dim, v_head_dim)
        if MODULE not in sys.modules and not _installed():
            return "FA3 is not installed (flash-attention's hopper/ package: flash_attn_interface)"
        return None

    def supports(self, q):
        return self.device_problem(q.device, q.dtype, q.shape[-1])

    def forward(self, q, k, v, *, causal, scale, mask=None, softcap=None, window=None,
                segments=None, cu_seqlens=None):
        assert mask is None, "fa3 blocks take no mask (blocks._kernel_for routes them)"
        if segments is None:
            return dense_as_varlen_forward(
                lambda q, k, v, *rest: self._call(q, k, v, scale, softcap, *rest), q, k, v, causal, window)
        assert q.shape[0] == 1 and not causal, "varlen blocks: batch 1, causality in the window"
        return self._call(q, k, v, scale, softcap, window, segments, cu_seqlens)

    def _call(self, q, k, v, scale, softcap, window, segments, cu_seqlens):
        cu_q, cu_k = cu_seqlens_tensors(segments, cu_seqlens, q.device)
        left, right = window or (-1, -1)
        max_q, max_k = _max_lengths(segments)
        out, lse, *_ = _fa3()._flash_attn_forward(
            q[0], k[0], v[0], cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=max_q,
            max_seqlen_k=max_k, softmax_scale=scale, causal=False, window_size_left=left,
            window_size_right=right, softcap=0.0 if softcap is None else float(softcap))
        return out.unsqueeze(0), lse.unsqueeze(0)

    def backward(self, dout, q, k, v, out, lse, *, causal, scale, mask=None, softcap=None,
                 window=None, segments=None, cu_seqlens=None):
        assert mask is None, "fa3 blocks take no mask (blocks._kernel_for routes them)"
        if segments is None:
            return dense_as_varlen_backward(
                lambda *t_rest: self._call_backward(*t_rest[:6], scale, softcap, *t_rest[6:]),
                dout, q, k, v, out, lse, causal, window)
        assert q.shape[0] == 1 and not causal, "varlen blocks: batch 1, causality in the window"
        return self._call_backward(dout, q, k, v, out, lse, scale, softcap, window, segments, cu_seqlens)

    def _call_backward(self, dout, q, k, v, out, lse, scale, softcap, window, segments, cu_seqlens):
        cu_q, cu_k = cu_seqlens_tensors(segments, cu_seqlens, q.device)
        left, right = window or (-1, -1)
        max_q, max_k = _max_lengths(segments)
        dq, dk, dv = torch.empty_like(q[0]), torch.empty_like(k[0]), torch.empty_like(v[0])
        _fa3()._flash_attn_backward(
            dout[0].to(q.dtype).contiguous(), q[0], k[0], v[0], out[0].to(q.dtype).contiguous(),
            lse[0].contiguous(), cu_q, cu_k, None, None, max_q, max_k, dq, dk, dv,
            softmax_scale=scale, is_causal=False, window_size_left=left, window_size_right=right,
            softcap=0.0 if softcap is None else float(softcap))
        return dq.unsqueeze(0), dk.unsqueeze(0), dv.unsqueeze(0)
