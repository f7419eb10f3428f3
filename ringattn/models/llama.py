"""A Llama-style decoder whose attention is ringattn's front door.

RMSNorm, RoPE (configurable base theta, applied at each token's *global* position),
SwiGLU, grouped-query attention, tied or untied embeddings, optional per-layer
activation checkpointing (optionally with the saved layer inputs offloaded to host memory),
loss over sequence tiles (``forward(..., labels=...)``) and an optional sequence-tiled MLP
(``ringattn.models.tiling``). The model runs on the tokens one rank holds; sequence
parallelism is entirely inside ``sp.attention``. Each forward prepares one
``AttentionPlan`` (``sp.prepare``: the only collective and host sync attention needs) and
every layer, and every checkpoint recompute, reuses it. With ``sp=None`` (or an SP group of
size 1) attention is the library's one-process path (``SequenceParallel.single()``): packed
documents cost their visible blocks, never a dense s x s mask.
"""
from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..parallel import SequenceParallel
from .tiling import TiledMLP, activation_offload, check_memory_options, token_loss


@dataclass
class LlamaConfig:
    """Shape and options of ``Llama``. ``dim`` = ``n_heads`` x head_dim; ``n_kv_heads`` < n_heads
    is GQA. Parameters and activations take the dtype the model is cast to (the recipe:
    ``trainer.dtype``); RoPE tables follow it, the loss is fp32. The memory options
    (checkpointing, offload, tiled loss and MLP) change what is kept, not the result."""

    dim: int = 128
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: Optional[int] = None  # None: = n_heads (no GQA)
    vocab_size: Optional[int] = None  # None: taken from the tokenizer
    ffn_hidden_dim: Optional[int] = None  # None: Llama rule from dim / multiple_of
    ffn_dim_multiplier: Optional[float] = None
    multiple_of: int = 32
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    tie_embeddings: bool = False
    activation_checkpointing: bool = False
    # saved layer inputs (activation checkpointing) in pinned host memory; CUDA only (no-op on CPU)
    offload_activations: bool = False
    # loss over sequence tiles from the hidden states (forward(labels=...)): the full
    # (tokens x vocab) logits never exist. false: materialise them (the reference path)
    tiled_loss: bool = True
    loss_tile_tokens: Optional[int] = None  # None: fp32 tile logits of ~256 MiB (tiling.TILE_BYTES)
    tiled_mlp: bool = False  # SwiGLU over sequence tiles, recomputed per tile in backward
    mlp_tile_tokens: Optional[int] = None  # None: a tile's ffn-wide tensors ~256 MiB
    init_std: float = 0.02
    attention_sinks: bool = False  # a learned per-head logit in every softmax (GPT-OSS)
    logit_softcap: Optional[float] = None  # scores -> c * tanh(scores / c) (Gemma 2)

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def ffn_dim(self) -> int:
        if self.ffn_hidden_dim:
            return self.ffn_hidden_dim
        hidden = int(2 * 4 * self.dim / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * math.ceil(hidden / self.multiple_of)

    def validate(self) -> None:
        if self.vocab_size is None or self.vocab_size <= 0:
            raise ValueError("model.vocab_size must be set (or derived from the tokenizer)")
        if self.dim % self.n_heads:
            raise ValueError(f"model.dim={self.dim} is not divisible by model.n_heads={self.n_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for RoPE")
        if self.n_heads % self.kv_heads:
            raise ValueError(f"model.n_heads={self.n_heads} is not a multiple of model.n_kv_heads={self.kv_heads}")
        if self.logit_softcap is not None and not self.logit_softcap > 0:
            raise ValueError(f"model.logit_softcap must be positive or null; got {self.logit_softcap}")
        check_memory_options(self)

    @property
    def out_std(self) -> float:
        """Init std of the residual-branch outputs (wo, w2), GPT-2 style."""
        return self.init_std / math.sqrt(2 * self.n_layers)

    def num_params(self, include_embedding: bool = True) -> int:
        d, f, L, V = self.dim, self.ffn_dim, self.n_layers, self.vocab_size or 0
        attn = d * d * 2 + 2 * d * self.kv_heads * self.head_dim
        attn += self.n_heads if self.attention_sinks else 0
        per_layer = attn + 3 * d * f + 2 * d
        emb = V * d * (1 if self.tie_embeddings else 2)
        return L * per_layer + d + (emb if include_embedding else 0)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.type_as(x) * self.weight


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos/sin of shape (seq, head_dim) for the given *global* positions (1-D LongTensor)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float64) / head_dim))
    angles = positions.to(torch.float64)[:, None] * inv_freq[None, :]
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: (batch, seq, heads, head_dim); cos/sin: (seq, head_dim). Rotate-half convention.
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos[None, :, None, :] + rotated * sin[None, :, None, :]


class Linear(nn.Linear):
    """Bias-free linear layer initialised N(0, std) when built. Each module initialises its own
    weights in its constructor, so a model built inside ``deepspeed.zero.Init`` (which
    partitions each module's parameters as soon as it is constructed) gets the same weights."""

    def __init__(self, in_features: int, out_features: int, std: float):
        self.std = std
        super().__init__(in_features, out_features, bias=False)

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, 0.0, self.std)


class Embedding(nn.Embedding):
    """Token embedding initialised N(0, std) when built (see ``Linear``)."""

    def __init__(self, num_embeddings: int, dim: int, std: float):
        self.std = std
        super().__init__(num_embeddings, dim)

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, 0.0, self.std)


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.n_heads, self.kv_heads, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        self.wq = Linear(cfg.dim, cfg.n_heads * cfg.head_dim, cfg.init_std)
        self.wk = Linear(cfg.dim, cfg.kv_heads * cfg.head_dim, cfg.init_std)
        self.wv = Linear(cfg.dim, cfg.kv_heads * cfg.head_dim, cfg.init_std)
        self.wo = Linear(cfg.n_heads * cfg.head_dim, cfg.dim, cfg.out_std)
        # (n_heads,) sink logits, zero at init (a sink weighs like one more key of score 0)
        self.sinks = nn.Parameter(torch.zeros(cfg.n_heads)) if cfg.attention_sinks else None
        self.softcap = cfg.logit_softcap

    def forward(self, x, cos, sin, attend):
        """x (b, s, dim) -> (b, s, dim). ``attend(q, k, v, *, sinks, softcap)`` -> (b, s, heads,
        head_dim) is the attention itself, given q (b, s, heads, head_dim) and k, v (b, s,
        kv_heads, head_dim) with RoPE applied to q and k: the step's sequence-parallel
        attention in training (``Llama.forward``), the sharded KV cache in generation
        (``ringattn.models.generation``), so both run this same block."""
        b, s, _ = x.shape
        q = apply_rope(self.wq(x).view(b, s, self.n_heads, self.head_dim), cos, sin)
        k = apply_rope(self.wk(x).view(b, s, self.kv_heads, self.head_dim), cos, sin)
        v = self.wv(x).view(b, s, self.kv_heads, self.head_dim)
        out = attend(q, k, v, sinks=self.sinks, softcap=self.softcap)
        return self.wo(out.reshape(b, s, -1))


class FeedForward(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.w1 = Linear(cfg.dim, cfg.ffn_dim, cfg.init_std)
        self.w3 = Linear(cfg.dim, cfg.ffn_dim, cfg.init_std)
        self.w2 = Linear(cfg.ffn_dim, cfg.dim, cfg.out_std)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        ffn = FeedForward(cfg)
        self.feed_forward = TiledMLP(ffn, cfg.ffn_dim, cfg.mlp_tile_tokens) if cfg.tiled_mlp else ffn

    def forward(self, x, cos, sin, attend):
        """x (b, s, dim) -> (b, s, dim); ``attend``: see ``Attention.forward``."""
        x = x + self.attention(self.attention_norm(x), cos, sin, attend)
        return x + self.feed_forward(self.ffn_norm(x))


class Llama(nn.Module):
    """Decoder over the tokens this rank holds. ``sp``: a ``ringattn.SequenceParallel`` (attention
    across its group) or None (one process). See ``forward`` for shapes."""

    def __init__(self, cfg: LlamaConfig, sp=None):
        super().__init__()
        cfg.validate()
        self.cfg, self.sp = cfg, sp
        # every module initialises its own weights as it is built (see Linear); norms start at 1
        self.tok_embeddings = Embedding(cfg.vocab_size, cfg.dim, cfg.init_std)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = None if cfg.tie_embeddings else Linear(cfg.dim, cfg.vocab_size, cfg.init_std)

    def build_plan(self, shape, cu_seqlens=None, mask=None, device=None):
        """The attention plan of a forward over local tokens of ``shape``, built on the host
        with no collective (``SequenceParallel.build_plan``): build it with the batch, ahead
        of the step, and pass it to ``forward(plan=...)``."""
        sp = self.sp if self.sp is not None else SequenceParallel.single()
        return sp.build_plan(shape, cu_seqlens=cu_seqlens, device=device, mask=mask)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, cu_seqlens=None, labels=None,
                mask=None, plan=None):
        """tokens: (batch, local_seq) ids; positions: (local_seq,) RoPE positions (global, or within
        each document when packed). cu_seqlens: int32 document boundaries of the *full* packed
        sequence (batch 1), or None. Returns logits (batch, local_seq, vocab); with ``labels``
        (batch, local_seq), -100 = ignored, a ``tiling.TokenLoss`` (loss sum, correct count)
        computed over sequence tiles without the full logits (``cfg.tiled_loss``). ``mask``: a
        ``ringattn.RangeMask`` of the full sequence (shared prompts, prefix-LM...) instead of
        causal attention over ``cu_seqlens``. ``plan``: ``build_plan(...)`` of these
        arguments, made ahead; None: built here."""
        sp = self.sp if self.sp is not None else SequenceParallel.single()
        # Once per forward, before any layer: the cross-rank checks (the plan's one
        # collective) and the plan every layer (and every checkpoint recompute, which gets
        # it as an argument) reuses.
        if plan is None:
            plan = self.build_plan(tokens.shape, cu_seqlens, mask, tokens.device)
        plan = plan.agree()
        attend = functools.partial(sp.attention, causal=mask is None, mask=mask, plan=plan)
        h = self.tok_embeddings(tokens)
        cos, sin = rope_cos_sin(positions, self.cfg.head_dim, self.cfg.rope_theta, h.dtype)
        ckpt = self.cfg.activation_checkpointing and self.training and torch.is_grad_enabled()
        offload = ckpt and self.cfg.offload_activations
        # offload needs the reentrant checkpoint: it saves the layer input through the saved-tensor
        # hooks (save_on_cpu); the non-reentrant one keeps it by reference, on the device
        with activation_offload(h.device) if offload else contextlib.nullcontext():
            for layer in self.layers:
                if ckpt:
                    h = checkpoint(layer, h, cos, sin, attend, use_reentrant=offload)
                else:
                    h = layer(h, cos, sin, attend)
        # the head weight is read here, in the model's own forward (ZeRO-3 gathers it for this call)
        weight = self.tok_embeddings.weight if self.output is None else self.output.weight
        if labels is None:
            return F.linear(self.norm(h), weight)
        # the final norm runs per tile inside the loss: only its input is kept
        return token_loss(h, weight, labels, self.cfg.loss_tile_tokens, tiled=self.cfg.tiled_loss, norm=self.norm)
