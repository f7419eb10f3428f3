"""Run the Llama's ordinary forward while keeping each layer's attention projections.

Forward hooks on ``wq``/``wk``/``wv`` (PyTorch's public extension point: the training
forward stays as it is, whatever strategy or per-step plan it uses) keep their outputs;
q and k come back with RoPE applied at the tokens' positions, exactly as attention saw them.
"""
from __future__ import annotations

import torch

from .llama import Llama, apply_rope, rope_cos_sin


def forward_capturing(model: Llama, tokens: torch.Tensor, positions: torch.Tensor,
                      names=("wq", "wk", "wv"), cu_seqlens=None):
    """-> (logits (batch, s, vocab), [per layer {"q": (b, s, heads, head_dim), "k"/"v":
    (b, s, kv_heads, head_dim)} for the requested projections]). tokens/positions: this
    rank's shard, as for ``model(tokens, positions, cu_seqlens)``."""
    if not isinstance(model, Llama):
        raise ValueError(f"forward_capturing needs ringattn.models.Llama; got {type(model).__name__}")
    captured: list[dict[str, torch.Tensor]] = [{} for _ in model.layers]
    hooks = []
    for i, layer in enumerate(model.layers):
        for name in names:
            def keep(_mod, _inp, out, i=i, name=name):
                captured[i][name] = out
            hooks.append(getattr(layer.attention, name).register_forward_hook(keep))
    try:
        logits = model(tokens, positions) if cu_seqlens is None else model(tokens, positions, cu_seqlens)
    finally:
        for h in hooks:
            h.remove()
    cfg, (b, s) = model.cfg, tokens.shape
    heads = {"wq": cfg.n_heads, "wk": cfg.kv_heads, "wv": cfg.kv_heads}
    cos = sin = None
    result = []
    for layer in captured:
        out = {}
        for name, t in layer.items():
            t = t.view(b, s, heads[name], cfg.head_dim)
            if name != "wv":
                if cos is None:
                    cos, sin = rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta, t.dtype)
                t = apply_rope(t, cos, sin)
            out[name[1]] = t
        result.append(out)
    return logits, result
