"""Run the Llama's ordinary forward while keeping each layer's attention projections.

Forward hooks on ``wq``/``wk``/``wv`` (PyTorch's public extension point: the training
forward stays as it is, whatever strategy or per-step plan it uses) keep their outputs;
q and k come back with RoPE applied at the tokens' positions, exactly as attention saw them.
"""
from __future__ import annotations

import torch

from .llama import Llama, apply_rope, rope_cos_sin


def forward_capturing(model: Llama, tokens: torch.Tensor, positions: torch.Tensor,
                      names=("wq", "wk", "wv"), cu_seqlens=None, on_layer=None):
    """-> (logits (batch, s, vocab), [per layer {"q": (b, s, heads, head_dim), "k"/"v":
    (b, s, kv_heads, head_dim)} for the requested projections]). tokens/positions: this
    rank's shard, as for ``model(tokens, positions, cu_seqlens)``.

    ``on_layer(i, projections)``: called during the forward as soon as layer i's projections
    exist; the list then holds its return values instead, and no layer's projections are
    kept beyond its call (memory of one layer, not all). Every rank must pass the same kind
    of callback: it may communicate (the forward runs in the same order everywhere).
    """
    if not isinstance(model, Llama):
        raise ValueError(f"forward_capturing needs ringattn.models.Llama; got {type(model).__name__}")
    cfg, (b, s) = model.cfg, tokens.shape
    heads = {"wq": cfg.n_heads, "wk": cfg.kv_heads, "wv": cfg.kv_heads}
    cos, sin = rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta, model.tok_embeddings.weight.dtype)
    pending: list[dict[str, torch.Tensor]] = [{} for _ in model.layers]
    result: list = [None] * len(model.layers)

    def keep(i, name, out):
        t = out.view(b, s, heads[name], cfg.head_dim)
        pending[i][name[1]] = t if name == "wv" else apply_rope(t, cos.to(t.dtype), sin.to(t.dtype))
        if len(pending[i]) == len(names):
            result[i] = pending[i] if on_layer is None else on_layer(i, pending[i])
            pending[i] = {}

    hooks = [getattr(layer.attention, name).register_forward_hook(
                 lambda _mod, _inp, out, i=i, name=name: keep(i, name, out))
             for i, layer in enumerate(model.layers) for name in names]
    try:
        logits = model(tokens, positions) if cu_seqlens is None else model(tokens, positions, cu_seqlens)
    finally:
        for h in hooks:
            h.remove()
    return logits, result
