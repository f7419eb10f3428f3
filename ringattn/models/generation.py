"""Generation for ``ringattn.models.Llama`` over a KV cache sharded across the SP group.

1. Prefill: the model's ordinary forward over the prompt, sharded by the SP layout (ring,
   Ulysses or hybrid; any layout). Forward hooks on each layer's ``wk``/``wv`` (a public
   extension point; the training forward is untouched; ``capture.forward_capturing``) capture
   the K/V projections of this rank's prompt shard, which become this rank's part of the cache (RoPE applied at their
   global positions). Prompt tokens past the largest length the layout can split are fed
   as decode steps.
2. Decode: each new token's layers (the model's own ``Block.forward``) run replicated on
   every rank; its K/V is appended to the rank with the shortest cache (ties: the lowest
   rank), and attention is
   ``ringattn.decode_attention`` over all parts. Shortest-cache rather than round-robin:
   it keeps the longest part -- which sets the per-step kernel time and the peak memory of
   the slowest rank -- as short as possible even when the prefill left the parts uneven
   (a prompt remainder, or a prompt shorter than the group), and every rank computes the
   same choice from host-side lengths, with no communication.
Sampling draws on the device from a generator seeded alike on every rank (no host copy per
token); group rank 0's token is broadcast on the device (one tiny collective per token), so
every rank continues with the same token even if the ranks' probabilities differ in a last bit.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..decode import decode_attention
from ..layouts import layout_divisor, layout_needs_documents
from .capture import forward_capturing
from .llama import Llama, rope_cos_sin


class KVCache:
    """This rank's part of the KV cache of every layer, plus every rank's part length.

    ``layer(i)`` -> (k, v), each (batch, s_r, kv_heads, head_dim), keys with RoPE applied.
    Storage grows by doubling, so appending one token is O(1) amortised, not a copy of the
    whole part. ``lengths`` (host ints, identical on every rank) lets each rank pick the
    owner of a new token without communicating.
    """

    def __init__(self, n_layers: int, world_size: int, rank: int):
        self.rank, self.lengths = rank, [0] * world_size
        self._k: list[torch.Tensor | None] = [None] * n_layers
        self._v: list[torch.Tensor | None] = [None] * n_layers

    @property
    def length(self) -> int:
        return self.lengths[self.rank]

    def owner(self) -> int:
        """The rank that takes the next token: the shortest part, ties to the lowest rank."""
        return min(range(len(self.lengths)), key=lambda r: (self.lengths[r], r))

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Append (batch, t, kv_heads, head_dim) K/V to this rank's part of ``layer``
        (call ``advance`` once all layers got theirs)."""
        n, t = self.length, k.shape[1]
        buf_k, buf_v = self._k[layer], self._v[layer]
        if buf_k is None or buf_k.shape[1] < n + t:
            cap = max(n + t, 2 * (0 if buf_k is None else buf_k.shape[1]))
            new_k = k.new_empty(k.shape[0], cap, *k.shape[2:])
            new_v = v.new_empty(new_k.shape)
            if n:
                new_k[:, :n], new_v[:, :n] = buf_k[:, :n], buf_v[:, :n]
            buf_k, buf_v = self._k[layer], self._v[layer] = new_k, new_v
        buf_k[:, n:n + t], buf_v[:, n:n + t] = k, v

    def advance(self, rank: int, t: int) -> None:
        """Record that ``rank``'s part grew by ``t`` tokens (every rank calls it)."""
        self.lengths[rank] += t

    def layer(self, i: int, like: torch.Tensor, kv_heads: int, pending: int = 0
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's (k, v) part of layer ``i``, including ``pending`` tokens appended since
        the last ``advance``; an empty (batch, 0, kv_heads, head_dim) part if it holds none."""
        if self._k[i] is None:
            empty = like.new_empty(like.shape[0], 0, kv_heads, like.shape[-1])
            return empty, empty
        n = self.length + pending
        return self._k[i][:, :n], self._v[i][:, :n]

    def nbytes(self) -> int:
        """Bytes of K/V this rank holds (its part's tokens, not the spare capacity)."""
        return sum(2 * k[:, :self.length].numel() * k.element_size() for k in self._k if k is not None)


def _sp_info(model):
    sp = model.sp
    if sp is None or sp.world_size == 1:
        return None, 1, 0, 1, "auto"
    inner = sp.ulysses_size if sp.strategy == "hybrid" else 1  # ranks per ring position's shard
    ring = sp.world_size // inner
    divisor = math.lcm(layout_divisor(sp.layout, ring), ring * inner)
    return sp.group, sp.world_size, sp.rank, divisor, sp.backend


def _one_document(n: int) -> torch.Tensor:
    """cu_seqlens of one document of ``n`` tokens, on the host: document boundaries are host
    metadata (the step's plan reads them there; a device copy would cost a host sync)."""
    return torch.tensor([0, n], dtype=torch.int32)


@torch.no_grad()
def prefill(model: Llama, prompt: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """Run the model over ``prompt`` (batch, n; n a multiple of the layout's divisor), the
    same on every rank, sharded over the SP group; store each rank's K/V shard in ``cache``.
    Returns the logits (batch, vocab) after the last prompt token, on every rank."""
    group, p, rank, _, _ = _sp_info(model)
    n = prompt.shape[1]
    sp = model.sp if p > 1 else None
    # a layout that places tokens by document (doc_zigzag) sees the prompt as one document
    docs = _one_document(n) if sp and layout_needs_documents(sp.layout) else None
    tokens = sp.shard(prompt, cu_seqlens=docs) if sp else prompt
    positions = (sp.positions(n, device=prompt.device, cu_seqlens=docs) if sp
                 else torch.arange(n, device=prompt.device))
    # packed-document attention takes one sequence at a time: then prefill row by row
    rows = [slice(None)] if docs is None else [slice(i, i + 1) for i in range(prompt.shape[0])]
    runs = [forward_capturing(model, tokens[r], positions, names=("wk", "wv"), cu_seqlens=docs) for r in rows]
    logits = torch.cat([lg for lg, _ in runs])
    for i in range(len(model.layers)):
        cache.append(i, torch.cat([lay[i]["k"] for _, lay in runs]), torch.cat([lay[i]["v"] for _, lay in runs]))
    s = tokens.shape[1]
    for r in range(p):
        cache.advance(r, s)  # every layout splits the prompt into P equal parts
    last = (positions == n - 1).to(logits.dtype)  # the one local row holding position n-1, if any
    out = torch.einsum("bsv,s->bv", logits.float(), last.float())
    if p > 1:
        dist.all_reduce(out, group=group)
    return out


@torch.no_grad()
def decode_step(model: Llama, tokens: torch.Tensor, position: int, cache: KVCache) -> torch.Tensor:
    """One token per sequence (batch, 1) at global ``position``, the same on every rank:
    every layer runs the model's own ``Block.forward``, with attention over the sharded cache
    (``_cache_attention``). -> logits (batch, vocab)."""
    group, _, rank, _, backend = _sp_info(model)
    owner = cache.owner()
    h = model.tok_embeddings(tokens)
    # the position as a fill value, not Python data: no host-to-device copy per token
    cos, sin = rope_cos_sin(torch.full((1,), position, device=tokens.device), model.cfg.head_dim,
                            model.cfg.rope_theta, h.dtype)
    for i, layer in enumerate(model.layers):
        h = layer(h, cos, sin, _cache_attention(cache, i, rank == owner, group, backend))
    cache.advance(owner, 1)
    h = model.norm(h)
    weight = model.tok_embeddings.weight if model.output is None else model.output.weight
    return F.linear(h, weight)[:, -1].float()


def _cache_attention(cache: KVCache, layer: int, owns: bool, group, backend):
    """The ``attend`` of layer ``layer``'s block for one decode step: the owner appends the
    new token's K/V (RoPE applied) to its part; every rank attends over all parts."""
    def attend(q, k, v, *, sinks, softcap):
        if owns:
            cache.append(layer, k, v)
        k_part, v_part = cache.layer(layer, q, k.shape[2], pending=int(owns))
        return decode_attention(q, k_part, v_part, group=group, backend=backend, softcap=softcap,
                                sinks=sinks)
    return attend


def _sample(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One draw per row from ``probs`` (rows sum to 1), on their device, with no host sync:
    the index of the smallest Exp(1)/p_i, i.e. the first of independent exponential clocks
    with rates p_i to ring -- index i with probability p_i (the exponential race;
    ``torch.multinomial`` would do, but on some devices and releases it checks its input
    on the host). A zero noise sample (possible in principle) is raised to the smallest
    positive float, so a p_i = 0 entry stays 0 instead of 0/0."""
    noise = torch.empty_like(probs).exponential_(generator=generator)
    return (probs / noise.clamp_min_(torch.finfo(probs.dtype).tiny)).argmax(-1, keepdim=True)


def _choose(logits, temperature, top_k, generator, group, p):
    """Next tokens (batch, 1): greedy at temperature 0, else sampled on the logits' device;
    then group rank 0's choice is broadcast (on the device), so every rank continues with
    the same token even if a last bit of the probabilities differed between ranks."""
    if temperature == 0:
        nxt = logits.argmax(-1, keepdim=True)
    else:
        scaled = logits / temperature
        if top_k is not None:
            kth = scaled.topk(min(top_k, scaled.shape[-1]), dim=-1).values[:, -1:]
            scaled = scaled.masked_fill(scaled < kth, float("-inf"))
        nxt = _sample(torch.softmax(scaled, dim=-1), generator)
    if p > 1:
        dist.broadcast(nxt, src=dist.get_global_rank(group or dist.group.WORLD, 0), group=group)
    return nxt


@torch.no_grad()
def generate(model, prompt: torch.Tensor, max_new_tokens: int, *, temperature: float = 0.0,
             top_k: int | None = None, generator: torch.Generator | None = None,
             return_logits: bool = False):
    """Greedy (``temperature=0``) or sampled continuation of ``prompt`` (batch, n), the same
    on every rank of ``model.sp``'s group. Prefill over the group with its strategy and
    layout, then decode over the sharded cache (see the module doc).

    Returns tokens (batch, n + max_new_tokens), the same on every rank, and with
    ``return_logits`` also the fp32 logits (batch, max_new_tokens, vocab) each new token was
    chosen from (equal to the full forward's at positions n-1 ... n+max_new_tokens-2).
    ``generator``: the generator sampling draws from, on the model's device (e.g.
    ``torch.Generator(device="cuda").manual_seed(s)``); seed it alike on every rank, so every
    rank draws the same tokens (group rank 0's are used). None: the device's default generator.
    """
    if not isinstance(model, Llama):
        raise ValueError(
            f"generate: sharded-KV-cache generation supports ringattn.models.Llama; got "
            f"{type(model).__name__}. Hugging Face models are refused: transformers' Cache "
            "interface gives the attention function the full K/V of every layer, not a "
            "per-rank part, and this adapter does not patch transformers internals")
    if prompt.dim() != 2 or prompt.shape[1] == 0 or prompt.dtype != torch.long:
        raise ValueError(f"generate: prompt must be a non-empty (batch, n) LongTensor; got "
                         f"shape {tuple(prompt.shape)}, dtype {prompt.dtype}")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"generate: max_new_tokens must be a positive int; got {max_new_tokens!r}")
    if temperature < 0 or (top_k is not None and top_k < 1):
        raise ValueError(f"generate: temperature must be >= 0 and top_k >= 1; got {temperature}, {top_k}")
    if generator is not None and generator.device.type != prompt.device.type:
        raise ValueError(
            f"generate: generator is on {generator.device}, the prompt on {prompt.device}: tokens "
            f"are sampled on the model's device, so the generator must be there too (e.g. "
            f"torch.Generator(device={prompt.device.type!r}).manual_seed(seed))")
    group, p, rank, divisor, _ = _sp_info(model)
    cache = KVCache(model.cfg.n_layers, p, rank)
    n = prompt.shape[1]
    m = n // divisor * divisor  # what the layout can split; the rest goes token by token
    logits = prefill(model, prompt[:, :m], cache) if m else None
    for pos in range(m, n):
        logits = decode_step(model, prompt[:, pos:pos + 1], pos, cache)
    tokens, steps = [prompt], []
    for i in range(max_new_tokens):
        steps.append(logits)
        nxt = _choose(logits, temperature, top_k, generator, group, p)
        tokens.append(nxt)
        if i + 1 < max_new_tokens:
            logits = decode_step(model, nxt, n + i, cache)
    out = torch.cat(tokens, dim=1)
    return (out, torch.stack(steps, dim=1)) if return_logits else out
