"""Bad input raises a ValueError that names the problem (single process, P = 1)."""
from __future__ import annotations

import pytest
import torch

import ringattn


def qkv(b=1, s=8, h=4, hk=2, d=16, dtype=torch.float32):
    return torch.randn(b, s, h, d, dtype=dtype), torch.randn(b, s, hk, d, dtype=dtype), \
        torch.randn(b, s, hk, d, dtype=dtype)


@pytest.mark.parametrize("make, match", [
    (lambda: (torch.randn(8, 4, 16), *qkv()[1:]), "q must have 4 dims"),
    (lambda: (qkv()[0], qkv()[1].double(), qkv()[2]), "dtypes differ"),
    (lambda: (qkv()[0], *qkv(d=32)[1:]), "head_dim differs"),
    (lambda: qkv(h=6, hk=4), r"heads \(6\) must be a multiple of kv_heads \(4\)"),
    (lambda: (qkv()[0], *qkv(b=2)[1:]), "batch sizes differ"),
    (lambda: (qkv()[0], qkv()[1], qkv(s=6)[2]), "k and v differ in batch, length or kv_heads"),
    (lambda: (qkv()[0], *qkv(s=6)[1:]), "equal local q and k/v lengths"),
    (lambda: tuple(t.long() for t in qkv()), "floating-point"),
])
def test_malformed_inputs(make, match):
    with pytest.raises(ValueError, match=match):
        ringattn.ring_attention(*make(), causal=True)


def test_dropout_is_refused_not_ignored():
    with pytest.raises(ValueError, match="dropout is not supported"):
        ringattn.ring_attention(*qkv(), dropout_p=0.1)


def test_layout_that_cannot_split_the_length_says_what_it_needs():
    with pytest.raises(ValueError, match="'zigzag' over 1 ranks needs the sequence length to be a multiple of 2; got 7"):
        ringattn.ring_attention(*qkv(s=7), layout="zigzag")
    ringattn.ring_attention(*qkv(s=7), layout="striped")  # any length over one rank
    with pytest.raises(ValueError, match="unknown layout 'diagonal'"):
        ringattn.ring_attention(*qkv(), layout="diagonal")


def test_unavailable_backend_is_an_error():
    with pytest.raises(ValueError, match="flash-attn runs on CUDA only"):
        ringattn.ring_attention(*qkv(), backend="flash_attn")


def test_gradient_through_returned_lse_is_refused():
    q, k, v = (t.requires_grad_() for t in qkv())
    out, lse = ringattn.ring_attention(q, k, v, return_lse=True)
    out.sum().backward(retain_graph=True)  # fine: lse unused
    with pytest.raises(RuntimeError, match="gradients through the returned lse"):
        (out.sum() + lse.sum()).backward()


def test_front_door_single_process():
    sp = ringattn.SequenceParallel(layout="zigzag")
    assert sp.world_size == 1 and sp.rank == 0
    q, k, v = qkv(s=8)
    assert torch.equal(sp.positions(8), torch.arange(8))
    assert torch.equal(sp.shard(q), q) and torch.equal(sp.unshard(q), q)
    ref = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, enable_gqa=True)
    assert torch.allclose(sp.attention(q, k, v, causal=True), ref.transpose(1, 2), atol=1e-6)
    with pytest.raises(ValueError, match="unknown strategy 'megatron'"):
        ringattn.SequenceParallel(strategy="megatron")
