"""torch's own varlen attention (``torch.nn.attention.varlen``, torch >= 2.10), no extra package.

Forward is the public ``varlen_attn(q, k, v, cu_seq_q, cu_seq_k, max_q, max_k,
return_aux=AuxRequest(lse=True), scale=, window_size=, enable_gqa=)``: torch's flash-attention
2 (vendored in aten), or FA3 / FA4 once activated through torch's registry
(``torch.nn.attention.activate_flash_attention_impl``, see ``ringattn.kernels.choice``).

torch gives no public block backward with an external lse: ``varlen_attn``'s autograd
backward reuses the (out, lse) its own forward saved, while the ring's backward needs the
*merged* row's. So backward calls ``aten::_flash_attention_backward`` directly, with exactly
the arguments torch's ``_varlen_attn_backward`` passes it (torch/nn/attention/varlen.py):
dropout 0, ``is_causal``, the rng_state, an empty ``unused``, ``scale``,
``window_size_left/right``.

Every block runs as one varlen call: a dense block is its batch as sequences, a window band is
``window_size``, a top-left causal block the band (-1, n - m) (or the first n keys' triangle),
packed documents their cu_seqlens. The aten op is torch's copy of flash-attn 2's
``mha_varlen_fwd`` and applies flash-attn's window rule against ``max_seqlen_k``
(``ringattn.kernels.flash.flash_window``), so ``max_k`` is raised past every bound
(``flash._max_lengths``) and every band stays exact. Returns lse (heads, total_q) fp32, a row
with no key out 0 / lse +inf (the merge ignores it). No softcap (the aten op has none: softcap
blocks go to ``math``), no dense mask. The aten op takes one head size for q/k/v (torch's copy of flash_api.cpp checks
it), so MLA's unequal sizes are zero-padded to one and sliced back (``pad_head_dims``, exact).
"""
from __future__ import annotations

import functools

import torch

from .base import (backward_one_head_size, cu_seqlens_tensors, cuda_problem, dense_as_varlen_backward, dense_as_varlen_forward,
                   forward_one_head_size)
from .flash import _max_lengths


@functools.lru_cache(maxsize=None)
def _varlen():
    try:
        from torch.nn.attention import varlen
    except ImportError:  # pragma: no cover - torch < 2.10
        return None
    return varlen


def cpu_kernel_registered() -> bool:
    """Whether aten::_flash_attention_forward has a CPU kernel: never in torch itself (CUDA
    only); the test suite registers a CPU stand-in with ``torch.library``."""
    return torch._C._dispatch_has_kernel_for_dispatch_key("aten::_flash_attention_forward", "CPU")


class TorchVarlenBackend:
    name = "torch_varlen"
    supports_mask = False
    supports_softcap = False  # aten::_flash_attention_forward has no softcap argument
    supports_window = True
    supports_varlen = True

    def device_problem(self, device: torch.device, dtype: torch.dtype, head_dim: int,
                       v_head_dim: int | None = None) -> str | None:
        """None if torch's varlen attention runs this device/dtype/head dims, else why not."""
        if _varlen() is None:
            return "torch.nn.attention.varlen needs torch >= 2.10"
        if device.type == "cuda":
            problem = cuda_problem("torch's flash attention", device, dtype, lambda major: major >= 8,
                                   "an Ampere (sm80) or newer GPU")
            if problem:
                return problem
        elif not (device.type == "cpu" and cpu_kernel_registered()):
            return "torch's varlen attention runs on CUDA only"
        if head_dim > 256 or head_dim % 8:
            return f"torch's flash attention needs head_dim <= 256 and a multiple of 8, got {head_dim}"
        if v_head_dim is not None and v_head_dim > 256:  # a narrower side is padded to the wider
            return f"torch's flash attention needs v's head_dim <= 256, got {v_head_dim}"
        return None

    def supports(self, q):
        return self.device_problem(q.device, q.dtype, q.shape[-1])

    def forward(self, q, k, v, *, causal, scale, mask=None, softcap=None, window=None,
                segments=None, cu_seqlens=None):
        assert mask is None and softcap is None, "torch_varlen takes no mask or softcap"
        if q.shape[-1] != v.shape[-1]:  # one head size in the aten op: pad, slice (exact)
            return forward_one_head_size(self.forward, q, k, v, causal=causal, scale=scale, window=window,
                                         segments=segments, cu_seqlens=cu_seqlens)
        if segments is None:
            return dense_as_varlen_forward(lambda q, k, v, *rest: self._call(q, k, v, scale, *rest),
                                           q, k, v, causal, window)
        assert q.shape[0] == 1 and not causal, "varlen blocks: batch 1, causality in the window"
        return self._call(q, k, v, scale, window, segments, cu_seqlens)

    def _call(self, q, k, v, scale, window, segments, cu_seqlens):
        """One varlen_attn call on (1, total, heads, d) -> (out, lse (1, heads, total_q))."""
        varlen = _varlen()
        cu_q, cu_k = cu_seqlens_tensors(segments, cu_seqlens, q.device)
        window = tuple(window or (-1, -1))
        out, lse = varlen.varlen_attn(
            q[0], k[0], v[0], cu_q, cu_k, *_max_lengths(segments, window),
            return_aux=varlen.AuxRequest(lse=True), scale=scale, window_size=window,
            enable_gqa=q.shape[2] != k.shape[2])
        return out.unsqueeze(0), lse.unsqueeze(0)

    def backward(self, dout, q, k, v, out, lse, *, causal, scale, mask=None, softcap=None,
                 window=None, segments=None, cu_seqlens=None):
        assert mask is None and softcap is None, "torch_varlen takes no mask or softcap"
        if q.shape[-1] != v.shape[-1]:  # as forward: one head size, padded with zeros
            return backward_one_head_size(self.backward, dout, q, k, v, out, lse, causal=causal, scale=scale,
                                          window=window, segments=segments, cu_seqlens=cu_seqlens)
        if segments is None:
            return dense_as_varlen_backward(
                lambda *t_rest: self._call_backward(*t_rest[:6], scale, *t_rest[6:]),
                dout, q, k, v, out, lse, causal, window)
        assert q.shape[0] == 1 and not causal, "varlen blocks: batch 1, causality in the window"
        return self._call_backward(dout, q, k, v, out, lse, scale, window, segments, cu_seqlens)

    def _call_backward(self, dout, q, k, v, out, lse, scale, window, segments, cu_seqlens):
        """aten::_flash_attention_backward as torch's ``_varlen_attn_backward`` calls it."""
        cu_q, cu_k = cu_seqlens_tensors(segments, cu_seqlens, q.device)
        left, right = window or (-1, -1)
        rng_state = torch.zeros(2, dtype=torch.uint64, device=q.device)  # no dropout
        unused = torch.empty(0, device=q.device)
        dq, dk, dv = torch.ops.aten._flash_attention_backward(
            dout[0].to(q.dtype), q[0], k[0], v[0], out[0].to(q.dtype), lse[0].contiguous(),
            cu_q, cu_k, *_max_lengths(segments, (left, right)), 0.0, (left, right) == (-1, 0),
            rng_state, unused, scale=scale, window_size_left=left, window_size_right=right)
        return dq.unsqueeze(0), dk.unsqueeze(0), dv.unsqueeze(0)
