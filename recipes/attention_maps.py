"""Attention maps for the needle evaluation (``ringattn.attention_mass``, exact, inside the SP group).

- needle mass: at every (length, depth) cell, the softmax mass the answer position (the
  query marker, which predicts the first digit) puts on the needle (marker + digits), per
  layer and head, averaged over samples; plus its top-5 attended positions in sample 0.
- distance mass: mass by query-key distance (log-spaced buckets) per layer and head,
  averaged over sampled query positions of the longest context.
Written to ``attention.json``, ``attention_needle.png`` and ``attention_distance.png``.
These show where the heads look, not why the model answers (values, later layers and the
MLPs intervene): evidence to read alongside the accuracy map, not an explanation.
"""
from __future__ import annotations

import os

import numpy as np
import torch

import ringattn
from ringattn.models.capture import forward_capturing
from recipes.data import PasskeyTask

TOP_K = 5
DISTANCE_QUERIES = 16


def _masses(model, ctx, tokens, queries, **kw):
    """``ringattn.attention_mass`` of every layer for global ``queries``, computed during one
    forward over this rank's shard (each layer's q/k dropped right after its call)."""
    positions = ctx.sp.positions(tokens.shape[1], device=ctx.device)

    def mass(i, qk):
        attn = model.layers[i].attention
        return ringattn.attention_mass(qk["q"], qk["k"], positions, queries, group=ctx.sp.group,
                                       softcap=attn.softcap, sinks=attn.sinks, **kw)
    _, per_layer = forward_capturing(model, ctx.sp.shard(tokens.to(ctx.device)), positions,
                                     names=("wq", "wk"), on_layer=mass)
    return per_layer


@torch.no_grad()
def needle_attention(model, ctx, lengths, depths, digits, make_samples, seed) -> dict:
    """``make_samples(length, depth)`` -> the cell's (tokens, labels) batch (full sequences,
    the same on every SP rank). Returns the JSON-ready maps."""
    needle, top = {}, {}
    for length in lengths:
        q_at = length - digits  # the query marker: its prediction is the first answer digit
        for depth in depths:
            at = PasskeyTask.needle_at(depth, length, digits)
            tokens, _ = make_samples(length, depth)
            masses = _masses(model, ctx, tokens, [q_at], spans=[(at, at + digits + 1)], top_k=TOP_K)
            needle[f"{length}/{depth}"] = [m.span_mass[..., 0, 0].mean(0).tolist() for m in masses]  # (heads,)
            top[f"{length}/{depth}"] = [m.top_positions[0, :, 0].tolist() for m in masses]
    length = max(lengths)
    tokens, _ = make_samples(length, depths[len(depths) // 2])
    rng = np.random.Generator(np.random.PCG64([seed, length]))
    queries = sorted(rng.choice(length, size=min(DISTANCE_QUERIES, length), replace=False).tolist())
    masses = _masses(model, ctx, tokens, queries)
    by_distance = [m.distance_mass.tolist() for m in masses]  # per layer (heads, buckets)
    edges = masses[0].distance_edges
    return {"needle_mass": needle, "needle_top_positions": top, "top_k": TOP_K,
            "distance_mass": by_distance, "distance_edges": edges, "distance_length": length,
            "distance_queries": queries, "lengths": list(lengths), "depths": list(depths),
            "digits": digits}


def plot(maps: dict, out_dir: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths, depths = maps["lengths"], maps["depths"]
    n_layers = len(maps["distance_mass"])
    fig, axes = plt.subplots(1, len(lengths), figsize=(3.6 * len(lengths), 3.2), squeeze=False, sharey=True)
    for ax, length in zip(axes[0], lengths):
        for layer in range(n_layers):
            heads = np.array([maps["needle_mass"][f"{length}/{d}"][layer] for d in depths])  # (depths, heads)
            line, = ax.plot(depths, heads.mean(1), marker="o", label=f"layer {layer} mean")
            ax.plot(depths, heads.max(1), ls="--", color=line.get_color(), label=f"layer {layer} max head")
        ax.set_title(f"length {length}")
        ax.set_xlabel("needle depth")
        ax.set_ylim(0, 1)
    axes[0][0].set_ylabel("attention mass on needle\n(from the answer position)")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    needle_png = os.path.join(out_dir, "attention_needle.png")
    fig.savefig(needle_png, dpi=100)
    plt.close(fig)

    edges = maps["distance_edges"]
    labels = [f"{a}" if b - a == 1 else f"{a}-{b - 1}" for a, b in zip(edges[:-1], edges[1:])]
    fig, ax = plt.subplots(figsize=(6, 3.4))
    for layer, per_head in enumerate(maps["distance_mass"]):
        ax.plot(range(len(labels)), np.mean(per_head, axis=0), marker="o", label=f"layer {layer}")
    ax.set_xticks(range(len(labels)), labels, rotation=45, fontsize=7)
    ax.set_xlabel("query-key distance (tokens)")
    ax.set_ylabel("attention mass (mean over heads)")
    ax.set_title(f"mass by distance, {len(maps['distance_queries'])} queries, length {maps['distance_length']}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    distance_png = os.path.join(out_dir, "attention_distance.png")
    fig.savefig(distance_png, dpi=100)
    plt.close(fig)
    return [needle_png, distance_png]
