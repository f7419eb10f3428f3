"""A CPU stand-in for torch's CUDA flash-attention ops, so that torch's own
``torch.nn.attention.varlen.varlen_attn`` (and ringattn's ``torch_varlen`` backend, which
calls it) runs unchanged on CPU tensors.

    from tests.torch_flash_standin import torch_flash_on_cpu
    with torch_flash_on_cpu():
        out, lse = varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, return_aux=AuxRequest(lse=True))

It registers CPU kernels for ``aten::_flash_attention_forward`` and
``aten::_flash_attention_backward`` (the ops varlen_attn's custom op ``torch_attn::_varlen_attn``
and its backward call; torch 2.13's torch/nn/attention/varlen.py, ``_varlen_attn`` and
``_varlen_attn_backward``) through ``torch.library.Library("aten", "IMPL")``: the public
extension point, removed again when the context exits. Only the varlen branch (cum_seq_q
given) is modelled; a dense call is refused.

Conventions, each naming the source it mirrors (pytorch, torch 2.13):
- aten/src/ATen/native/transformers/cuda/attention.cu ``_flash_attention_forward``: a missing
  window_size_left is -1; a missing window_size_right is ``is_causal ? 0 : -1``; with
  cum_seq_q defined it calls ``mha_varlen_fwd`` and returns (output, logsumexp, rng_state,
  unused, debug_attn_mask), the debug mask ``at::empty({0})`` when not asked for.
- attention_backward.cu ``_flash_attention_backward``: missing window sides are -1 (is_causal
  is passed on, and mha_varlen_bwd sets right = 0); with cum_seq_q defined it calls
  ``mha_varlen_bwd`` (softcap 0: the aten op has no softcap).
- cuda/flash_attn/flash_api.cpp (torch's vendored flash-attn 2) ``mha_varlen_fwd`` /
  ``mha_varlen_bwd`` / ``set_params_fprop``: the same code as flash-attn 2.8.3's, so this module
  runs ``tests/flash_attn_standin.py``'s varlen_fwd / varlen_bwd, whose rules cite it: causal off
  when max_seqlen_q == 1, causal -> right 0, a window side >= max_seqlen_k -> -1, a one-sided
  window's open side closed at max_seqlen_k; lse ``at::empty({num_heads, total_q}, kFloat)``;
  a row with no key: out 0, lse +inf; max_seqlen_k == 0: out 0, lse +inf; q, k and v share
  head_size_og (``CHECK_SHAPE(v, total_k, num_heads_k, head_size_og)``: no v head dim of its
  own), head_size_og <= 256 and a multiple of 8; GQA native (dk/dv summed over the group).
Deviations, on purpose: CPU tensors of any float dtype (the CUDA op takes fp16/bf16), math in
fp32 (fp64 for fp64 inputs, lse too, so float64 checks are exact); no dropout, ALiBi,
seqused_k, block_table; num_splits is ignored (it only changes the reduction order).
"""
from __future__ import annotations

import contextlib

import torch

from tests.flash_attn_standin import make_module

_FA2 = make_module((2, 8))  # torch vendors flash-attn 2's flash_api.cpp (mha_varlen_* as 2.8.3)


def _check(cond, msg):
    if not cond:
        raise RuntimeError(msg)  # TORCH_CHECK raises RuntimeError


def flash_attention_forward(query, key, value, cum_seq_q, cum_seq_k, max_q, max_k, dropout_p,
                            is_causal, return_debug_mask, *, scale=None, window_size_left=None,
                            window_size_right=None, seqused_k=None, alibi_slopes=None,
                            block_table=None, num_splits=None):
    """attention.cu ``_flash_attention_forward``, varlen branch -> (output (total_q, h, d),
    logsumexp (h, total_q), rng_state, unused, debug_attn_mask)."""
    _check(cum_seq_q is not None and cum_seq_k is not None,
           "the CPU stand-in models the varlen branch only (cum_seq_q given)")
    _check(not return_debug_mask, "the CPU stand-in has no debug mask")
    _check(seqused_k is None and block_table is None, "the CPU stand-in has no seqused_k / paged KV")
    _check(value.shape[-1] == query.shape[-1],
           f"v must have shape ({key.shape[0]}, {key.shape[1]}, {query.shape[-1]})")
    left = -1 if window_size_left is None else window_size_left
    right = (0 if is_causal else -1) if window_size_right is None else window_size_right
    softmax_scale = query.shape[-1] ** -0.5 if scale is None else scale  # sdp::calculate_scale
    out, lse, _, rng_state = _FA2.varlen_fwd(
        query, key, value, None, cum_seq_q, cum_seq_k, None, None, None, alibi_slopes, max_q,
        max_k, dropout_p, softmax_scale, False, is_causal, left, right, 0.0, False, None)
    return (out, lse, rng_state.to(torch.uint64), torch.empty((), dtype=torch.uint64),
            torch.empty(0, dtype=query.dtype))


def flash_attention_backward(grad_out, query, key, value, out, logsumexp, cum_seq_q, cum_seq_k,
                             max_q, max_k, dropout_p, is_causal, rng_state, unused, *, scale=None,
                             window_size_left=None, window_size_right=None):
    """attention_backward.cu ``_flash_attention_backward``, varlen branch -> (dq, dk, dv) shaped
    like query, key, value (GQA: dk/dv with the key's heads)."""
    _check(cum_seq_q is not None and cum_seq_q.numel() > 0,
           "the CPU stand-in models the varlen branch only (cum_seq_q given)")
    left = -1 if window_size_left is None else window_size_left
    right = -1 if window_size_right is None else window_size_right
    softmax_scale = query.shape[-1] ** -0.5 if scale is None else scale
    dq, dk, dv, _ = _FA2.varlen_bwd(
        grad_out.contiguous(), query, key, value, out.contiguous(), logsumexp, None, None, None,
        cum_seq_q, cum_seq_k, None, max_q, max_k, dropout_p, softmax_scale, False, is_causal,
        left, right, 0.0, False, None, rng_state)
    return dq, dk, dv


@contextlib.contextmanager
def torch_flash_on_cpu():
    """CPU kernels for aten::_flash_attention_forward / _backward while the context is open."""
    lib = torch.library.Library("aten", "IMPL")
    lib.impl("_flash_attention_forward", flash_attention_forward, "CPU")
    lib.impl("_flash_attention_backward", flash_attention_backward, "CPU")
    try:
        yield
    finally:
        lib._destroy()
