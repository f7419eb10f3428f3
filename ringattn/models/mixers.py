"""Recurrent token mixers of transformers hybrids under sequence parallelism, each module under
one of three schemes: Gated DeltaNet, KDA, lightning attention and Mamba2 head-parallel, and
Jamba's Mamba channel-parallel (``mixer_heads``: each rank runs its heads or channels over the
whole sequence between all-to-alls) when they cover the SP group; short convolutions over a
halo of k - 1 tokens per segment; a mixer with fewer heads than ranks over the gathered
sequence (the model's own mixer run over it in natural order, this rank's rows kept).

Hybrid models put recurrences along the sequence beside softmax attention: Gated DeltaNet /
KDA / lightning linear attention (Qwen3-Next, Qwen3.5, OLMo-Hybrid, Kimi-Linear,
Bailing-Hybrid, MiniMax), Mamba2 (Nemotron-H, Granite-MoE-Hybrid, Bamba, Falcon-H1, Zamba2),
Mamba (Jamba) and short causal convolutions (LFM2). A token's output depends on every earlier
token of its document in natural order, so a rank's shard alone (any layout) is not enough.

The scheme here is exact for every family and treats the model's mixer as a black box. Each
mixer module's forward is replaced by one of ours (an instance attribute; parameters and
state-dict keys unchanged; ``remove`` restores the class's), which for the gathered sequence

1. all-gathers the mixer's input hidden states (b, s/P, H) over the SP group
   (``comm.gather_sequence``: backward reduce-scatters, i.e. sums, the gradient);
2. puts them in natural order with one ``index_select`` (the inverse of the layout's
   permutation, zigzag's two chunks and doc_zigzag's runs included); with packed documents
   the same index lays the documents out as right-padded rows, one per document, in batches
   of documents of similar length (``document_batches``: lengths sharing ceil(log2), padding
   under 2x the tokens, at most ceil(log2(longest)) + 1 batches): each document starts from
   the mixer's zero state, and padding after a document's last token never reaches its rows
   (a causal recurrence only looks back);
3. runs the class's own forward on each batch, and keeps this rank's rows (b, s/P, H) in
   layout order with a second ``index_select``.

Gradients are exact: each rank back-propagates only its own rows' outputs, the all-gather's
backward sums every rank's input gradient into the owner's shard, and the parameter
gradients of the P ranks are summed by the usual sequence-parallel gradient reduction.

Cost per mixer layer and rank: one all-gather of S x H activations forward and one
reduce-scatter of the same size backward ((P-1)/P x S x H x bytes each), the mixer's
compute over the whole sequence (P-fold redundant) and O(S x H) activations saved for its
backward. With documents, padding adds under S tokens more. A state-passing scan of
O(state) bytes (no head limit) is not built; see docs/huggingface.md.

Short convolutions (LFM2) have a finite reach: the whole mixer (pointwise projections and
gates around one causal depthwise convolution of k taps) makes token t from tokens
t-k+1..t of its document. They take the **halo** scheme instead (``HaloIndex``): each
rank's rows are cut into segments (a layout run, cut again at document starts), every
segment gets the k - 1 tokens before it in its document (fewer at a document's start), and
the mixer runs over this rank's segments as right-padded rows (batched by length like
documents), each row starting at its first real token (so the mixer's own zero padding is the document start, biases included).
The halo tokens come from an all-gather of at most (k - 1) x segments rows per rank
(backward: their gradients summed into the owners): bytes independent of the sequence
length for contiguous, zigzag and doc_zigzag (per document), compute and activations 1/P
of the sequence plus the halos. Striped puts every neighbour on another rank: the halo is
then the whole shard (still exact).

The index tensors (``MixerPlan``) are built once per forward on the host, with the step's
attention plan (``SequenceMixers.plan``: host arithmetic on the layout, one copy to the
device, no collective), and set with ``use`` before the forward: the hot path adds no host
sync and no collective beyond the gathers and all-to-alls themselves. The plan in use lives
on this object for the step, so a checkpointed layer's recompute uses the latest forward's:
run a micro-batch's backward before the next micro-batch's forward (as the recipe and
transformers' Trainer do).
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..comm import gather_sequence
from ..layouts import get_layout
from ..sharding import held_indices
from .mixer_heads import HEAD_PARALLEL, head_parallel_forward, head_split

# The mixer classes of transformers 5.x hybrids, by family (checked in
# tests/test_hf_mixers.py: each is exact under every layout). Each is run as a black box.
MIXER_FAMILIES = {
    "gated_deltanet": ("Qwen3NextGatedDeltaNet", "Qwen3_5GatedDeltaNet", "Qwen3_5MoeGatedDeltaNet",
                       "OlmoHybridGatedDeltaNet", "BailingHybridDeltaAttention"),
    "kda": ("KimiLinearDeltaAttention",),
    "lightning": ("MiniMaxLightningAttention",),
    "mamba2": ("NemotronHMamba2Mixer", "GraniteMoeHybridMambaLayer", "BambaMixer", "FalconH1Mixer",
               "Zamba2MambaMixer"),
    "mamba": ("JambaMambaMixer",),
    "short_conv": ("Lfm2ShortConv", "Lfm2MoeShortConv"),
}
# Families whose whole mixer sees only the last ``reach(module)`` tokens: the halo scheme.
HALO_REACH = {"short_conv": lambda module: int(module.conv_kernel_size)}
MIXER_CLASSES = {cls: family for family, classes in MIXER_FAMILIES.items() for cls in classes}
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def find_mixers(model: nn.Module) -> dict[str, nn.Module]:
    """{qualified name: module} of every recurrent mixer ringattn knows in ``model``."""
    return {n: m for n, m in model.named_modules() if type(m).__name__ in MIXER_CLASSES}


def mixer_layers(model: nn.Module) -> set[int]:
    """Indices of the decoder layers (``...layers.<i>.``) that hold a known mixer."""
    return {int(m.group(1)) for n in find_mixers(model) if (m := _LAYER.search(n + "."))}


def attention_beside_mixer(model: nn.Module) -> bool:
    """Whether a decoder layer holding a mixer runs softmax attention too (Falcon-H1's parallel
    heads, Zamba2's hybrid layers): that layer's backward holds both working sets."""
    layers = mixer_layers(model)
    return any(type(m).__name__.endswith("Attention") and type(m).__name__ not in MIXER_CLASSES
               for n, m in model.named_modules() if (i := _LAYER.search(n + ".")) and int(i.group(1)) in layers)


def _held(sp, seqlen: int, cu) -> list[torch.Tensor]:
    """Every rank's global positions, in its local order: one vectorised pass over the
    layout's runs (O(runs), not a loop over ranks' tokens); hybrid splits each ring shard."""
    p = sp.world_size
    if p == 1:
        return [torch.arange(seqlen)]
    inner = sp.ulysses_size if sp.strategy == "hybrid" else 1
    if inner > 1:
        return [held_indices(sp.layout, seqlen, p, r, inner, cu) for r in range(p)]
    lay = get_layout(sp.layout)
    rank, pos0, _, length = lay.all_runs(seqlen, p, cu)
    total = int(length.sum())
    first = torch.cumsum(length, 0) - length
    step = torch.arange(total) - torch.repeat_interleave(first, length, output_size=total)
    pos = torch.repeat_interleave(pos0, length, output_size=total) + lay.stride_of(p) * step
    return list(pos.split((seqlen // p,) * p))


def document_batches(lengths: torch.Tensor) -> tuple[torch.Tensor, tuple[tuple[int, int], ...]]:
    """Packed documents of ``lengths`` (D,) as right-padded batches of similar lengths: the
    documents whose lengths share ceil(log2) form one batch (rows, its longest), batches in
    ascending length, documents in their order within one. Returns each document's first slot
    in the batches laid end to end, and the batches' (rows, length). Padding stays under 2x
    the tokens (one batch of documents x the longest would pad 15-30x at 1M-16M tokens with a
    long-tailed mix) for at most ceil(log2(longest)) + 1 kernel calls per layer."""
    size_class = torch.ceil(torch.log2(lengths.double())).long()
    by_class = torch.argsort(size_class, stable=True)
    classes, rows = torch.unique_consecutive(size_class[by_class], return_counts=True)
    which = torch.repeat_interleave(torch.arange(len(classes)), rows)  # batch of each sorted document
    longest = torch.zeros(len(classes), dtype=torch.int64).scatter_reduce(0, which, lengths[by_class], "amax")
    size = rows * longest
    row = torch.arange(len(lengths)) - torch.repeat_interleave(torch.cumsum(rows, 0) - rows, rows)
    first = torch.empty_like(lengths)
    first[by_class] = (torch.cumsum(size, 0) - size)[which] + row * longest[which]
    return first, tuple(zip(rows.tolist(), longest.tolist()))


def per_batch(shapes, run, *inputs: torch.Tensor) -> torch.Tensor:
    """``run`` over each batch of ``inputs`` (b, n, ...) laid out as ``shapes`` ((rows,
    length) per batch, end to end along dim 1): each batch an independent (b x rows, length,
    ...) batch whose rows start from the mixer's zero state; the outputs end to end again."""
    b, sizes = inputs[0].shape[0], [r * n for r, n in shapes]
    parts = zip(*(t.split(sizes, 1) for t in inputs))
    outs = [run(*(t.reshape(b * r, n, *t.shape[2:]) for t in ts)) for (r, n), ts in zip(shapes, parts)]
    return torch.cat([o.reshape(b, -1, *o.shape[2:]) for o in outs], 1)


@dataclass(frozen=True)
class MixerIndex:
    """One forward's permutation between the rank-major gathered sequence (every rank's rows
    in turn, as ``gather_sequence`` / ``heads_to_sequence`` return it) and the mixer's
    natural-order input: (b, S, H) as it is, or with packed documents (1, n, H), the
    right-padded batches of ``document_batches`` laid end to end (``batches`` cuts it).
    ``gather`` (n,) indexes rows of [gathered sequence; one zero row]; ``ungather`` (S,) is
    the slot of each gathered row in the natural-order output; ``mine`` (s/P,) this rank's."""

    gather: torch.Tensor
    ungather: torch.Tensor
    shapes: Optional[tuple]  # (rows, length) of each batch of documents; None: no documents
    group: object
    world: int
    rank: int

    @property
    def mine(self) -> torch.Tensor:
        local = len(self.ungather) // self.world
        return self.ungather[self.rank * local:(self.rank + 1) * local]

    def natural(self, x: torch.Tensor) -> torch.Tensor:
        """(b, S, ...) rank-major -> the mixer's input in natural order (b, S, ...) or, with
        documents, (1, n, ...): the batches end to end."""
        if self.shapes is not None:
            zero = x.new_zeros(1, 1, *x.shape[2:])
            return torch.cat([x, zero], 1).index_select(1, self.gather)
        return x.index_select(1, self.gather) if self.world > 1 else x

    def rank_major(self, y: torch.Tensor) -> torch.Tensor:
        """Inverse of ``natural`` for the mixer's output (natural order) -> (b, S, ...)."""
        if self.shapes is not None or self.world > 1:
            return y.index_select(1, self.ungather)
        return y

    def per_batch(self, run, *inputs: torch.Tensor) -> torch.Tensor:
        """``run`` over each batch of documents of the natural-order ``inputs`` (see
        ``per_batch``); without documents, ``run(*inputs)``."""
        return run(*inputs) if self.shapes is None else per_batch(self.shapes, run, *inputs)

    @classmethod
    def build(cls, sp, shape, cu_seqlens=None, device=None) -> "MixerIndex":
        """Host work once per forward for local shards of ``shape`` = (b, s/P)."""
        p, local = sp.world_size, int(shape[1])
        seqlen = local * p
        cu = None if cu_seqlens is None else torch.as_tensor(cu_seqlens).to("cpu", torch.int64)
        held = torch.cat(_held(sp, seqlen, cu))
        order = torch.argsort(held)  # natural position -> row of the rank-major gather
        shapes = None
        if cu is not None:
            if int(shape[0]) != 1:
                raise ValueError("packed documents (cu_seqlens) take batch 1")
            lengths = cu[1:] - cu[:-1]
            first, shapes = document_batches(lengths)
            doc = torch.repeat_interleave(torch.arange(len(lengths)), lengths, output_size=seqlen)
            slot = first[doc] + torch.arange(seqlen) - cu[:-1][doc]  # natural pos -> padded slot
            gather = torch.full((sum(r * n for r, n in shapes),), seqlen, dtype=torch.int64)  # the zero row
            gather[slot] = order
            order, held = gather, slot[held]
        return cls(order.to(device), held.to(device), shapes, None if p == 1 else sp.group, p,
                   0 if p == 1 else sp.rank)


@dataclass(frozen=True)
class HaloIndex:
    """One forward's halo permutation for mixers of reach k. ``send`` (E,) local rows the
    other ranks need (padded to the largest E of any rank); ``batch`` (n,) indexes rows of
    [local shard; every rank's E sent rows; one zero row] into this rank's segments, each
    after its halo, right-padded in batches of similar length laid end to end (``shapes``,
    as ``document_batches`` makes them); ``mine`` (s/P,) this rank's rows in the mixer's
    output (b, n, H)."""

    send: torch.Tensor
    batch: torch.Tensor
    mine: torch.Tensor
    shapes: tuple  # (rows, length) of each batch of segments
    group: object
    world: int

    @classmethod
    def build(cls, sp, shape, cu_seqlens=None, device=None, reach: int = 1) -> "HaloIndex":
        p, local = sp.world_size, int(shape[1])
        seqlen = local * p
        cu = None if cu_seqlens is None else torch.as_tensor(cu_seqlens).to("cpu", torch.int64)
        held = _held(sp, seqlen, cu)
        me = 0 if p == 1 else sp.rank
        doc_start = torch.zeros(seqlen, dtype=torch.int64)
        if cu is not None:
            doc_start = torch.repeat_interleave(cu[:-1], cu[1:] - cu[:-1], output_size=seqlen)
        everyone = torch.cat(held)
        owner = torch.empty(seqlen, dtype=torch.int64)
        owner[everyone] = torch.repeat_interleave(torch.arange(p), local)
        row_of = torch.empty(seqlen, dtype=torch.int64)
        row_of[everyone] = torch.arange(local).repeat(p)

        def segments(pos):
            """A rank's segments: first local row a, length n, halo length h (vectors), and
            the halo positions, all segments' concatenated."""
            cut = torch.ones(len(pos), dtype=torch.bool)
            cut[1:] = (pos[1:] != pos[:-1] + 1) | (doc_start[pos[1:]] == pos[1:])
            a = torch.nonzero(cut).flatten()
            n = torch.diff(a, append=torch.tensor([len(pos)]))
            q0 = pos[a]
            h = torch.clamp(q0 - doc_start[q0], max=reach - 1)
            total = int(h.sum())
            first = torch.cumsum(h, 0) - h
            halo = torch.repeat_interleave(q0 - h, h, output_size=total) + torch.arange(total) \
                - torch.repeat_interleave(first, h, output_size=total)
            return a, n, h, halo

        # what each owner sends: every position another rank's halo needs from it
        needed = []
        for r, pos in enumerate(held):
            halo = segments(pos)[3]
            needed.append(halo[owner[halo] != r])
        wanted = torch.unique(torch.cat(needed))
        sends = [wanted[owner[wanted] == r] for r in range(p)] if p > 1 else [torch.empty(0, dtype=torch.int64)]
        width = max(1, max(len(e) for e in sends))
        slot_in_gather = torch.full((seqlen,), -1, dtype=torch.int64)
        for r, e in enumerate(sends):
            slot_in_gather[e] = local + r * width + torch.arange(len(e))
        zero = local + (p * width if p > 1 else 0)

        a, n, h, halo = segments(held[me])
        first, shapes = document_batches(h + n)  # segments of similar length batched together
        seg = torch.arange(len(a))
        batch = torch.full((sum(r * m for r, m in shapes),), zero, dtype=torch.int64)
        halo_seg = torch.repeat_interleave(seg, h, output_size=len(halo))
        halo_col = torch.arange(len(halo)) - torch.repeat_interleave(torch.cumsum(h, 0) - h, h, output_size=len(halo))
        batch[first[halo_seg] + halo_col] = torch.where(owner[halo] == me, row_of[halo], slot_in_gather[halo])
        tok_seg = torch.repeat_interleave(seg, n, output_size=local)
        mine = first[tok_seg] + h[tok_seg] + torch.arange(local) - a[tok_seg]
        batch[mine] = torch.arange(local)
        send = row_of[sends[me]] if p > 1 else torch.empty(0, dtype=torch.int64)
        send = torch.cat([send, send.new_zeros(width - len(send))]) if p > 1 else send
        return cls(send.to(device), batch.to(device), mine.to(device), shapes, None if p == 1 else sp.group, p)


@dataclass(frozen=True)
class MixerPlan:
    """A forward's mixer permutations (``SequenceMixers.plan``)."""

    index: Optional[MixerIndex]  # gathered sequence and head-parallel mixers
    halos: dict  # reach -> HaloIndex (short convolutions)
    splits: dict  # id(module) -> its heads' HeadSplit (head-parallel); None: gathered instead


class SequenceMixers:
    """Every known mixer of a transformers model under its scheme (see the module doc): the
    families of ``mixer_heads.HEAD_PARALLEL`` head-parallel when their heads cover the SP group,
    short convolutions over a halo, the rest over the gathered sequence. ``use`` sets the
    step's ``MixerPlan`` once per forward."""

    def __init__(self, model: nn.Module):
        self.mixers = find_mixers(model)
        self.index: Optional[MixerIndex] = None
        self.halos: dict[int, HaloIndex] = {}  # reach -> this forward's halo index
        self.splits: dict = {}  # id(module) -> HeadSplit of a head-parallel mixer, or None
        self._reach = {}  # id(module) -> reach, for mixers of the halo scheme
        self._forwards = []  # every known mixer: its forward is ours until ``remove``
        for module in self.mixers.values():
            name = type(module).__name__
            reach = HALO_REACH.get(MIXER_CLASSES[name])
            if reach is not None:
                self._reach[id(module)] = reach(module)
                forward = self._halo
            elif name in HEAD_PARALLEL:
                forward = self._head_parallel
            else:
                forward = self._gathered
            # an instance attribute shadows the class's forward (the batches of documents need
            # one call of it per batch, which a pre/post hook pair cannot make)
            module.forward = functools.partial(forward, module)
            self._forwards.append(module)

    def __bool__(self) -> bool:
        return bool(self.mixers)

    def schemes(self) -> dict[str, str]:
        """{mixer name: scheme} as of the latest ``use``."""
        def scheme(module):
            if id(module) in self._reach:
                return "halo"
            return "heads" if self.splits.get(id(module)) is not None else "gathered"
        return {n: scheme(m) for n, m in self.mixers.items()}

    def plan(self, sp, shape, cu_seqlens=None, device=None) -> "MixerPlan":
        """The permutations every mixer of a forward over local shards of ``shape`` reads:
        host work with no collective and no change to this object (build it ahead, e.g. in
        the planning thread, with the step's attention plan)."""
        gathered = len(self._reach) < len(self.mixers)
        p = sp.world_size
        return MixerPlan(
            MixerIndex.build(sp, shape, cu_seqlens, device) if gathered else None,
            {k: HaloIndex.build(sp, shape, cu_seqlens, device, k) for k in set(self._reach.values())},
            {id(m): head_split(m, p) for m in self._forwards if type(m).__name__ in HEAD_PARALLEL})

    def use(self, plan: "MixerPlan") -> None:
        """Set the forward's permutations (once per forward, before the model runs)."""
        self.index, self.halos, self.splits = plan.index, plan.halos, plan.splits

    def remove(self) -> None:
        for module in self._forwards:
            del module.forward
        self._forwards.clear()

    def _head_parallel(self, module, *args, **kwargs):
        """The forward of a mixer of a head-parallel family: head-parallel, or (fewer heads
        than ranks) the class's own forward over the gathered sequence."""
        split = self.splits.get(id(module))
        if split is None:
            return self._gathered(module, *args, **kwargs)
        x = self._input(module, self.index, args, kwargs)
        return head_parallel_forward(module, x, self.index, split)

    def _gathered(self, module, *args, **kwargs):
        """The class's own forward over the whole sequence in natural order (the local hidden
        states all-gathered; documents: once per batch of them), this rank's rows kept."""
        idx = self.index
        x = self._input(module, idx, args, kwargs)
        x = idx.natural(gather_sequence(x, 1, idx.group) if idx.world > 1 else x)
        out, rest = self._per_batch(module, idx.shapes, x, args, kwargs)
        mine = out.index_select(1, idx.mine) if idx.shapes is not None or idx.world > 1 else out
        return mine if rest is None else (mine, *rest)

    def _halo(self, module, *args, **kwargs):
        """The class's own forward over this rank's segments, each after its halo (batches
        of segments of similar length), this rank's rows kept."""
        idx = self.halos.get(self._reach[id(module)])
        x = self._input(module, idx, args, kwargs)
        parts = [x]
        if idx.world > 1:  # the rows other ranks' halos need, from every rank
            parts.append(gather_sequence(x.index_select(1, idx.send), 1, idx.group))
        parts.append(x.new_zeros(x.shape[0], 1, x.shape[-1]))
        x = torch.cat(parts, 1).index_select(1, idx.batch)
        out, rest = self._per_batch(module, idx.shapes, x, args, kwargs)
        mine = out.index_select(1, idx.mine)
        return mine if rest is None else (mine, *rest)

    def _per_batch(self, module, shapes, x, args, kwargs):
        """(output over ``x`` laid out as ``shapes``, the rest of a tuple output or None)."""
        rest = []

        def run(piece):
            a, kw = self._with_input(piece, args, kwargs)
            out = type(module).forward(module, *a, **kw)
            if isinstance(out, tuple):
                rest[:] = [tuple(out[1:])]
                return out[0]
            return out

        out = run(x) if shapes is None else per_batch(shapes, run, x)
        return out, (rest[0] if rest else None)

    @staticmethod
    def _input(module, idx, args, kwargs):
        if kwargs.get("cache") is not None or kwargs.get("cache_params") is not None:
            raise ValueError(f"{type(module).__name__}: a recurrent-state cache under sequence "
                             "parallelism (generation) is not supported; decode on one process")
        if idx is None:
            raise RuntimeError(f"{type(module).__name__}: the sequence mixers were not prepared "
                               "for this forward (HFCausalLM.forward does it)")
        if kwargs.get("attention_mask") is not None:
            raise ValueError(f"{type(module).__name__}: a padding mask reached the mixer; ringattn "
                             "takes packed documents (cu_seqlens), not padding")
        return args[0] if args else kwargs["hidden_states"]

    @staticmethod
    def _with_input(x, args, kwargs):
        if args:
            return (x, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": x}
