"""A CPU stand-in for PyTorch's CUDA memory-efficient attention ops, so that the CUDA branch
of ``ringattn.kernels.sdpa`` (``EfficientAttention``: bias expansion and alignment, the lse's
row padding stripped and re-added, the seeds) runs on CPU, under the device-strict checker.

Each function takes the op's schema (aten/src/ATen/native/native_functions.yaml):
    _scaled_dot_product_efficient_attention(query, key, value, attn_bias, compute_log_sumexp,
        dropout_p=0., is_causal=False, *, scale=None) -> (output, log_sumexp, philox_seed, philox_offset)
    _scaled_dot_product_efficient_attention_backward(grad_out_, query, key, value, attn_bias,
        out, logsumexp, philox_seed, philox_offset, dropout_p, grad_input_mask, is_causal=False,
        *, scale=None) -> (grad_query, grad_key, grad_value, grad_attn_bias)
and checks the conventions the branch depends on, each from the source it mirrors:
- log_sumexp is (B, H, ceil(M / 32) * 32): kAlignLSE = 32 in
  aten/src/ATen/native/transformers/cuda/attention.cu (``_efficient_attention_forward``;
  torch/_meta_registrations.py, ``meta__scaled_dot_product_efficient_attention``, says the
  same); rows past M are left unwritten (NaN here), so a caller that does not strip them fails;
  backward reads the padded layout and is given it back (checked here).
- the bias is (B, H, M, N), last dim contiguous, rows 16-aligned: the sdpa frontend pads it
  so (``preprocess_mask`` / ``pad_bias`` in aten/src/ATen/native/transformers/attention.cpp,
  mem-eff alignment 16) and the kernel checks the row stride (``attn_bias is not correctly
  aligned``).
- is_causal masks from the top left (j <= i), as every sdpa op.
- q, k, v have equal head counts (no GQA) and out is (B, H, M, K) over a (B, M, H, K) buffer.
- philox seed and offset: 0-dim int64 tensors (on the device here; unread without dropout).
Math in fp64 for fp64 inputs, else fp32; no dropout (refused).
"""
from __future__ import annotations

import torch

LSE_ALIGN = 32
BIAS_ALIGN = 16


def _check(cond, msg):
    if not cond:
        raise RuntimeError(msg)  # TORCH_CHECK raises RuntimeError


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_inputs(q, k, v, bias, dropout_p):
    _check(q.dim() == k.dim() == v.dim() == 4, "query, key, value must be 4-D (B, H, M, K)")
    _check(q.shape[1] == k.shape[1] == v.shape[1], "query, key and value need equal head counts")
    _check(q.shape[0] == k.shape[0] == v.shape[0] and k.shape[2] == v.shape[2], "shapes differ")
    _check(dropout_p == 0.0, "the stand-in has no dropout")
    if bias is not None:
        _check(bias.shape == (q.shape[0], q.shape[1], q.shape[2], k.shape[2]),
               f"attn_bias {tuple(bias.shape)} is not (B, H, M, N)")
        _check(bias.stride(-1) == 1, "attn_bias: last dim must be contiguous")
        _check(bias.stride(-2) % BIAS_ALIGN == 0, "attn_bias is not correctly aligned (strideM)")
        _check(bias.dtype == q.dtype, "attn_bias dtype must match query")


def _scores(q, k, bias, is_causal, scale):
    acc = _acc(q.dtype)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = torch.einsum("bhmk,bhnk->bhmn", q.to(acc), k.to(acc)) * scale
    if bias is not None:
        s = s + bias.to(acc)
    if is_causal:
        m, n = s.shape[-2:]
        top_left = torch.ones(m, n, dtype=torch.bool, device=s.device).tril()
        s = s.masked_fill(~top_left, float("-inf"))
    return s, scale


def forward(query, key, value, attn_bias, compute_log_sumexp, dropout_p=0.0, is_causal=False,
            *, scale=None):
    _check_inputs(query, key, value, attn_bias, dropout_p)
    s, _ = _scores(query, key, attn_bias, is_causal, scale)
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - lse[..., None]).nan_to_num(0.0)  # a row with no key: out 0
    b, h, m, _ = query.shape
    out = torch.empty(b, m, h, value.shape[-1], dtype=query.dtype,
                      device=query.device).transpose(1, 2)
    out.copy_(torch.einsum("bhmn,bhnk->bhmk", p, value.to(p.dtype)))
    padded = torch.full((b, h, -(-m // LSE_ALIGN) * LSE_ALIGN if compute_log_sumexp else 0),
                        float("nan"), dtype=_acc(query.dtype), device=query.device)
    if compute_log_sumexp:
        padded[..., :m] = lse
    seed = torch.empty((), dtype=torch.int64, device=query.device)
    return out, padded, seed, torch.empty_like(seed)


def backward(grad_out_, query, key, value, attn_bias, out, logsumexp, philox_seed, philox_offset,
             dropout_p, grad_input_mask, is_causal=False, *, scale=None):
    _check_inputs(query, key, value, attn_bias, dropout_p)
    m = query.shape[2]
    _check(logsumexp.shape == (*query.shape[:2], -(-m // LSE_ALIGN) * LSE_ALIGN),
           f"logsumexp {tuple(logsumexp.shape)} is not (B, H, M padded to {LSE_ALIGN})")
    _check(logsumexp.is_contiguous(), "logsumexp must be contiguous")
    for t in (philox_seed, philox_offset):
        _check(t.dim() == 0 and t.dtype == torch.int64, "philox seed/offset: 0-dim int64")
    _check(len(grad_input_mask) == 4, "grad_input_mask has 4 entries")
    s, scale = _scores(query, key, attn_bias, is_causal, scale)
    lse = logsumexp[..., :m, None].to(s.dtype)
    p = torch.where(torch.isinf(s) & (s < 0), torch.zeros_like(s), torch.exp(s - lse))
    do, o = grad_out_.to(s.dtype), out.to(s.dtype)
    dv = torch.einsum("bhmn,bhmk->bhnk", p, do)
    dp = torch.einsum("bhmk,bhnk->bhmn", do, value.to(s.dtype))
    ds = p * (dp - (do * o).sum(-1, keepdim=True))
    dq = torch.einsum("bhmn,bhnk->bhmk", ds, key.to(s.dtype)) * scale
    dk = torch.einsum("bhmn,bhmk->bhnk", ds, query.to(s.dtype)) * scale
    return dq.to(query.dtype), dk.to(key.dtype), dv.to(value.dtype), None
