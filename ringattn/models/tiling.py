"""Sequence-tiled compute for what grows with the sequence outside attention.

Two pieces, both exact (the same numbers as untiled, to fp32 rounding) and both recomputing
in backward instead of keeping per-token intermediates:

* ``token_loss(hidden, weight, labels, norm=final_norm)`` -- the sum of token cross-entropies
  of the output head over sequence tiles. The (tokens x vocab) logits never exist whole:
  forward keeps only the (pre-norm) hidden states and each token's log-sum-exp (4 bytes a
  token); backward recomputes one tile's norm and logits at a time and accumulates dW in
  fp32. It also counts correct argmax predictions, so accuracy needs no logits either.
* ``TiledMLP(mlp)`` -- any x -> x-shaped module (SwiGLU) applied a tile of sequence positions
  at a time (all of the batch's rows), its ffn-wide intermediates recomputed per tile in
  backward (ALST's TiledMLP idea); tiled without grad too, so a no-grad forward (evaluation,
  a reentrant checkpoint's first pass) never holds the whole ffn-wide tensors either.

``activation_offload(device)`` is the context that keeps saved tensors (the checkpointed
layers' inputs) in pinned host memory on CUDA.

Tile sizes default to a fixed byte budget per tile (``TILE_BYTES``), so the transient memory
is a constant, whatever the sequence length, vocabulary or width.
"""
from __future__ import annotations

import contextlib
import logging
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
TILE_BYTES = 256 * 2**20  # per tile: fp32 logits of the loss / ffn-wide tensors of the MLP


class TokenLoss(NamedTuple):
    """``loss_sum``: fp32 0-dim sum of the cross-entropy of the valid tokens (labels != -100);
    ``correct``: int64 0-dim count of valid tokens whose argmax logit is the label (no grad)."""

    loss_sum: torch.Tensor
    correct: torch.Tensor


def loss_tile_tokens(vocab_size: int, tile_tokens: Optional[int] = None) -> int:
    """Tokens per loss tile: ``tile_tokens`` if given, else fp32 tile logits of ~TILE_BYTES."""
    if tile_tokens is not None:
        if tile_tokens < 1:
            raise ValueError(f"loss tile_tokens={tile_tokens} must be >= 1 (or None: automatic)")
        return int(tile_tokens)
    return max(1, TILE_BYTES // (4 * vocab_size))


def mlp_tile_tokens(ffn_dim: int, element_size: int, tile_tokens: Optional[int] = None) -> int:
    """Tokens per MLP tile: given, or SwiGLU's three ffn-wide tensors of ~TILE_BYTES."""
    if tile_tokens is not None:
        if tile_tokens < 1:
            raise ValueError(f"MLP tile_tokens={tile_tokens} must be >= 1 (or None: automatic)")
        return int(tile_tokens)
    return max(1, TILE_BYTES // (3 * ffn_dim * element_size))


def _tile_logits(h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    # in the model's dtype then fp32, exactly as the untiled F.linear(h, w).float() does
    return F.linear(h, weight).float()


# torch.mm(..., out_dtype=) (the aten::mm.dtype overload) is newer than the oldest torch we
# support (2.4): without it, CUDA takes the upcast path too.
_MM_OUT_DTYPE = hasattr(torch.ops.aten.mm, "dtype")


def _matmul_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` accumulated and returned in fp32, for model-dtype (bf16/fp16/fp32) inputs.

    A tile's dW is one of many summed over the sequence: rounding each to bf16 before the
    sum would add one bf16 rounding per tile. On CUDA the half-precision GEMM writes its fp32
    accumulator directly (``out_dtype``: tensor-core speed); elsewhere the inputs are upcast
    (exact: a product of two bf16/fp16 numbers is exact in fp32), the same numbers.
    """
    if a.dtype == torch.float32:
        return a @ b
    if a.is_cuda and _MM_OUT_DTYPE:
        return torch.mm(a, b, out_dtype=torch.float32)
    return a.float() @ b.float()


def _set_grad_ready(params, ready: bool) -> None:
    # DeepSpeed ZeRO's gradient hooks read this flag (everything else ignores it): a parameter
    # whose gradient accumulates over tiles is reduced once, after the last tile
    for p in params:
        p.ds_grad_is_ready = ready


class _TiledCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, tile, norm, norm_params):
        # hidden (n, dim), weight (vocab, dim), labels (n,) -> loss_sum (), correct ()
        # norm: None, or a module applied to each tile first (recomputed in backward)
        n = hidden.shape[0]
        lse = torch.empty(n, dtype=torch.float32, device=hidden.device)
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        correct = torch.zeros((), dtype=torch.long, device=hidden.device)
        for a in range(0, n, tile):
            h = hidden[a:a + tile]
            logits = _tile_logits(h if norm is None else norm(h), weight)
            lab = labels[a:a + tile]
            valid = lab != IGNORE_INDEX
            lse[a:a + tile] = torch.logsumexp(logits, dim=-1)
            target = logits.gather(1, lab.clamp(min=0)[:, None]).squeeze(1)
            loss += torch.where(valid, lse[a:a + tile] - target, 0.0).sum()
            correct += ((logits.argmax(-1) == lab) & valid).sum()
            del logits
        ctx.save_for_backward(hidden, weight, labels, lse)
        ctx.tile, ctx.norm, ctx.norm_params = tile, norm, norm_params
        ctx.mark_non_differentiable(correct)
        return loss, correct

    @staticmethod
    def backward(ctx, grad_loss, _grad_correct):
        hidden, weight, labels, lse = ctx.saved_tensors
        tile, norm, n = ctx.tile, ctx.norm, hidden.shape[0]
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dh = torch.empty_like(hidden) if need_h else None
        dw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        rows = torch.arange(min(tile, n), device=hidden.device)
        starts = range(0, n, tile)
        for i, a in enumerate(starts):
            h = hidden[a:a + tile]
            if norm is not None:
                _set_grad_ready(ctx.norm_params, i == len(starts) - 1)
                h = h.detach().requires_grad_()
                with torch.enable_grad():
                    hn = norm(h)
            else:
                hn = h
            lab = labels[a:a + tile]
            valid = lab != IGNORE_INDEX
            # d(lse - logit[label]) / d logits = softmax - onehot(label), zero for ignored tokens
            g = _tile_logits(hn.detach(), weight).sub_(lse[a:a + tile, None]).exp_()
            g[rows[:len(lab)], lab.clamp(min=0)] -= 1.0
            g.mul_((valid.to(g.dtype) * grad_loss)[:, None])
            g = g.to(hidden.dtype)
            if need_w:
                dw += _matmul_fp32(g.t(), hn.detach())  # fp32 per tile, fp32 sum (see _matmul_fp32)
            if norm is not None:
                torch.autograd.backward(hn, g @ weight)  # norm parameters' and the tile's gradients
                if need_h:
                    dh[a:a + tile] = h.grad
            elif need_h:
                dh[a:a + tile] = g @ weight
            del g
        return dh, None if dw is None else dw.to(weight.dtype), None, None, None, None


def logits_loss(logits: torch.Tensor, labels: torch.Tensor) -> TokenLoss:
    """The untiled reference: ``TokenLoss`` from materialised logits (..., vocab), labels (...)."""
    logits, labels = logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1)
    loss = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")
    with torch.no_grad():
        correct = ((logits.argmax(-1) == labels) & (labels != IGNORE_INDEX)).sum()
    return TokenLoss(loss, correct)


def token_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
               tile_tokens: Optional[int] = None, tiled: bool = True,
               norm: Optional[nn.Module] = None) -> TokenLoss:
    """Sum of token cross-entropies of ``norm(hidden) @ weight.T`` against ``labels`` (-100: ignored).

    hidden (..., dim), weight (vocab, dim), labels (...) with the same leading shape. ``norm``
    (the final norm, optional) is applied per tile and recomputed in backward, so only its input
    is kept. ``tiled=False`` materialises the logits (the reference path, same result).
    """
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(f"labels shape {tuple(labels.shape)} != hidden states' tokens {tuple(hidden.shape[:-1])}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"head weight {tuple(weight.shape)} does not take hidden size {hidden.shape[-1]}")
    h, lab = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)
    if not tiled:
        return logits_loss(F.linear(h if norm is None else norm(h), weight), lab)
    tile = loss_tile_tokens(weight.shape[0], tile_tokens)
    params = [] if norm is None else [p for p in norm.parameters() if p.requires_grad]
    return TokenLoss(*_TiledCrossEntropy.apply(h, weight, lab, tile, norm, params))


class _TiledApply(torch.autograd.Function):
    """y = fn(x) tile by tile along dim 1 (b, s, dim); backward recomputes fn per tile and
    backpropagates it, so only x is kept. Parameter gradients accumulate over the tiles and
    are marked complete only after the last (``_set_grad_ready``)."""

    @staticmethod
    def forward(ctx, fn, tile, params, x):
        ctx.fn, ctx.tile, ctx.params = fn, tile, params
        ctx.save_for_backward(x)
        with torch.no_grad():
            return torch.cat([fn(x[:, a:a + tile]) for a in range(0, x.shape[1], tile)], dim=1)

    @staticmethod
    def backward(ctx, grad_out):
        (x,) = ctx.saved_tensors
        fn, tile, params = ctx.fn, ctx.tile, ctx.params
        dx = torch.empty_like(x) if ctx.needs_input_grad[3] else None
        starts = range(0, x.shape[1], tile)
        for i, a in enumerate(starts):
            _set_grad_ready(params, i == len(starts) - 1)
            xt = x[:, a:a + tile].detach().requires_grad_(dx is not None)
            with torch.enable_grad():
                y = fn(xt)
            torch.autograd.backward(y, grad_out[:, a:a + tile])
            if dx is not None:
                dx[:, a:a + tile] = xt.grad
        return None, None, None, dx


class TiledMLP(nn.Module):
    """An x -> x-shaped module (b, s, dim) -> (b, s, dim) applied over sequence tiles.

    Holds the wrapped module's children as its own, under the same names, so parameter names
    (state dicts, checkpoints, ``save_pretrained``) are those of the unwrapped model; the
    original module is kept only to call its forward. ``tile_tokens``: tokens per tile
    (None: SwiGLU's ffn-wide tensors of a tile ~ ``TILE_BYTES``, ``ffn_dim`` needed then).
    """

    def __init__(self, mlp: nn.Module, ffn_dim: Optional[int] = None, tile_tokens: Optional[int] = None):
        super().__init__()
        if tile_tokens is None and ffn_dim is None:
            raise ValueError("TiledMLP needs tile_tokens or the ffn width (ffn_dim) to choose it")
        if any(True for _ in mlp.named_parameters(recurse=False)):
            raise ValueError(f"TiledMLP wraps modules whose parameters live in submodules; "
                             f"{type(mlp).__name__} has its own")
        for name, child in mlp.named_children():
            self.add_module(name, child)
        self._inner = (mlp,)  # a tuple: not registered twice as a submodule
        self.ffn_dim, self.tile_tokens = ffn_dim, tile_tokens

    @property
    def inner(self) -> nn.Module:
        return self._inner[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tile = mlp_tile_tokens(self.ffn_dim or 1, x.element_size(), self.tile_tokens)
        if x.dim() != 3:
            raise ValueError(f"TiledMLP expects (batch, seq, dim) input, got shape {tuple(x.shape)}")
        if x.shape[1] <= tile:
            return self.inner(x)
        if not torch.is_grad_enabled():  # evaluation, or a reentrant checkpoint's first forward
            return torch.cat([self.inner(x[:, a:a + tile]) for a in range(0, x.shape[1], tile)], dim=1)
        params = [p for p in self.parameters() if p.requires_grad]
        return _TiledApply.apply(self.inner, tile, params, x)


def tile_mlps(model: nn.Module, ffn_dim: int, tile_tokens: Optional[int] = None, name: str = "mlp") -> int:
    """Replace every submodule called ``name`` (the decoder layers' MLPs) by ``TiledMLP`` of
    it, through ``setattr`` on its parent (the module tree's public interface). Returns how
    many were wrapped; raises if none."""
    targets = [(parent, child_name) for parent in model.modules()
               for child_name, child in parent.named_children()
               if child_name == name and not isinstance(child, TiledMLP)]
    if not targets:
        raise ValueError(f"no submodule named {name!r} to tile in {type(model).__name__}")
    for parent, child_name in targets:
        setattr(parent, child_name, TiledMLP(getattr(parent, child_name), ffn_dim, tile_tokens))
    return len(targets)


_said_cpu = False


def check_memory_options(cfg) -> None:
    """ValueError naming the field for a model config's tiling/offload options
    (``offload_activations``, ``activation_checkpointing``, ``loss_tile_tokens``,
    ``mlp_tile_tokens``); shared by our Llama's config and the recipe's HF model config."""
    if cfg.offload_activations and not cfg.activation_checkpointing:
        raise ValueError("model.offload_activations=true offloads the inputs saved by activation "
                         "checkpointing: set model.activation_checkpointing=true too")
    for name in ("loss_tile_tokens", "mlp_tile_tokens"):
        if getattr(cfg, name) is not None and getattr(cfg, name) < 1:
            raise ValueError(f"model.{name}={getattr(cfg, name)} must be >= 1 (or null: automatic)")


def activation_offload(device: torch.device):
    """Context in which saved tensors live in pinned host memory (CUDA; copies non-blocking);
    on other devices nothing to offload to: a no-op that says so once."""
    global _said_cpu
    if torch.device(device).type == "cuda":
        return torch.autograd.graph.save_on_cpu(pin_memory=True)
    if not _said_cpu:
        log.info("offload_activations: %s tensors already live in host memory; nothing to offload",
                 torch.device(device).type)
        _said_cpu = True
    return contextlib.nullcontext()


__all__ = ["IGNORE_INDEX", "TILE_BYTES", "TokenLoss", "TiledMLP", "activation_offload", "check_memory_options", "logits_loss", "loss_tile_tokens",
           "mlp_tile_tokens", "tile_mlps", "token_loss"]
