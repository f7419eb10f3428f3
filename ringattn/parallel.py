"""``SequenceParallel``: the one front door models use for sequence-parallel attention."""
from __future__ import annotations

import torch

from . import sharding
from .allgather import allgather_attention
from .comm import group_device, group_rank, group_size
from .hybrid import hybrid_attention
from .layouts import get_layout
from .masking import document_positions
from .mesh import mesh_sp_groups, mesh_sp_sizes, split_hybrid_groups
from .plan import STRATEGIES, AttentionPlan
from .ring import ring_attention
from .ulysses import local_attention, ulysses_attention


class SequenceParallel:
    """Holds the sequence-parallel group and layout; shards data and runs attention.

    strategy: "ring" (K/V pass around the ring), "allgather" (K/V all-gathered once per
    call, Llama 3 style; any mask, memory of the full K/V per rank), "ulysses" (all-to-all heads <-> sequence,
    needs heads >= P; uneven head counts are split unevenly) or "hybrid" (Ulysses over ``ulysses_size`` consecutive ranks
    inside each of ``ring_size`` ring positions; give either size, or a mesh from
    ``ringattn.init_mesh(..., ulysses=u)``). layout: "zigzag" | "striped" | "contiguous"
    (for hybrid it splits the sequence over the ring; see ``ringattn.sharding``).
    group: the process group whose ranks share one sequence (default: the world), or
    mesh: a mesh from ``init_mesh`` or its SP sub-mesh (``mesh["ring", "ulysses"]``).
    backend: kernel backend. Sizes are checked before any communication.
    ``SequenceParallel.single()``: one process, no group, whatever torch.distributed holds.

    Per step: ``plan = sp.prepare(tokens.shape, cu_seqlens=...)`` once (the only collective
    and host sync attention needs), then ``sp.attention(q, k, v, plan=plan)`` in every layer
    and recompute. With one rank, attention is ``local_attention`` (no communication).
    """

    _single = False

    def __init__(self, strategy: str = "ring", layout: str = "zigzag", group=None, *, mesh=None,
                 ring_size: int | None = None, ulysses_size: int | None = None,
                 backend: str = "auto"):
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {strategy!r}; choose one of {list(STRATEGIES)}")
        get_layout(layout)
        if mesh is not None and group is not None:
            raise ValueError("SequenceParallel: pass either group or mesh, not both")
        p, mesh_u = mesh_sp_sizes(mesh) if mesh is not None else (group_size(group), None)
        ring_size, ulysses_size = _resolve_sizes(strategy, p, ring_size, ulysses_size, mesh_u)
        self.strategy, self.layout, self.backend = strategy, layout, backend
        self.ring_size, self.ulysses_size = ring_size, ulysses_size
        # Everything is checked: now build groups (may communicate).
        ring_group = uly_group = None
        if mesh is not None:
            group, ring_group, uly_group = mesh_sp_groups(mesh)
        if strategy == "hybrid" and ring_group is None:
            ring_group, uly_group = split_hybrid_groups(group, ulysses_size)
        self.group, self.ring_group, self.ulysses_group = group, ring_group, uly_group

    @classmethod
    def single(cls, backend: str = "auto") -> "SequenceParallel":
        """One process holding whole sequences: no group and no communication, even where
        torch.distributed is initialised (e.g. a model built without sequence parallelism)."""
        sp = cls.__new__(cls)
        sp.strategy, sp.layout, sp.backend = "ring", "contiguous", backend
        sp.ring_size = sp.ulysses_size = 1
        sp.group = sp.ring_group = sp.ulysses_group = None
        sp._single = True
        return sp

    @property
    def world_size(self) -> int:
        return 1 if self._single else group_size(self.group)

    @property
    def rank(self) -> int:
        return 0 if self._single else group_rank(self.group)

    @property
    def device(self) -> torch.device:
        """The group's device (NCCL: the current GPU; gloo: the host); one process: torch's
        default device. Where ``positions`` puts its result unless told otherwise."""
        dev = None if self._single else group_device(self.group)
        return dev if dev is not None else torch.get_default_device()

    def prepare(self, shape, cu_seqlens=None, device=None, mask=None, rules=None) -> AttentionPlan:
        """This step's ``AttentionPlan`` for local shards of ``shape`` = (batch, local_seqlen)
        (e.g. ``tokens.shape``) and packed-document boundaries ``cu_seqlens``, or the step's
        ``RangeMask`` (or a list of them: every mask the step's calls pass as ``mask=``). ``device``:
        the data's (``tokens.device``); None: the group's if it needs one (NCCL: the current
        GPU), else the first attention call's. ``rules``: every (causal, window_size) the
        step's calls use (default: causal), each planned now, before any layer.

        Call it once per step on every rank of the group, then pass it to every
        ``attention`` call of the step: one tiny all-gather checks that all ranks hold equal
        shapes and the same cu_seqlens (else the same ValueError on every rank), and
        everything else attention needs is planned on the host, once. The same as
        ``build_plan(...)`` then ``agree()``, which lets the host work run ahead.
        """
        return self.build_plan(shape, cu_seqlens, device, mask, rules).agree()

    def build_plan(self, shape, cu_seqlens=None, device=None, mask=None, rules=None) -> AttentionPlan:
        """``prepare`` without its collective: the host work alone, safe in any thread (build
        the next step's plan while this step runs); call ``plan.agree()`` on every rank
        before the step uses it."""
        kw = dict(cu_seqlens=cu_seqlens, device=device, mask=mask, rules=rules)
        if self.world_size == 1:
            return AttentionPlan.build("local", "contiguous", shape, **kw)
        hybrid = self.strategy == "hybrid"
        return AttentionPlan.build(self.strategy, self.layout, shape,
                                   ring_group=self.ring_group if hybrid else self.group,
                                   ulysses_group=self.ulysses_group if hybrid else self.group,
                                   agree_over=[self.group], **kw)

    def attention(self, q, k, v, *, causal: bool | None = None, softmax_scale=None,
                  cu_seqlens=None, window_size=(-1, -1), return_lse=False, sinks=None,
                  softcap=None, plan: AttentionPlan | None = None, mask=None):
        """q (b, s_local, h, d), k/v (b, s_local, h_kv, d) -> (b, s_local, h, d) [, lse].

        ``plan``: this step's ``prepare(...)`` (carries cu_seqlens; no collective or host
        sync per call), or None to check and plan this call alone. ``cu_seqlens``: int32
        document boundaries of the full packed sequence (batch 1), without a plan;
        ``window_size``: (left, right) sliding window, -1 = unbounded; ``sinks``: (h,)
        per-head attention-sink logits (GPT-OSS); ``softcap``: logit softcapping (Gemma 2).
        ``mask``: a ``RangeMask`` given to ``prepare`` (the whole rule: ``causal`` then
        defaults to False, and True is refused); ``causal`` defaults to True without one.
        """
        if causal is None:
            causal = mask is None
        kw = dict(mask=mask, causal=causal, softmax_scale=softmax_scale, backend=self.backend,
                  return_lse=return_lse, cu_seqlens=cu_seqlens, window_size=window_size,
                  sinks=sinks, softcap=softcap, plan=plan)
        if self.world_size == 1:
            return local_attention(q, k, v, **kw)
        kw["layout"] = self.layout
        if self.strategy == "ring":
            return ring_attention(q, k, v, group=self.group, **kw)
        if self.strategy == "allgather":
            return allgather_attention(q, k, v, group=self.group, **kw)
        if self.strategy == "ulysses":
            return ulysses_attention(q, k, v, group=self.group, **kw)
        return hybrid_attention(q, k, v, ring_group=self.ring_group,
                                ulysses_group=self.ulysses_group, **kw)

    @property
    def _inner(self) -> int:
        """Ulysses ranks per ring position in the token sharding (1 unless hybrid)."""
        return self.ulysses_size if self.strategy == "hybrid" else 1

    def shard(self, x, dim: int = 1, cu_seqlens=None):
        """Full tensor (s along ``dim``, any dtype) -> this rank's shard (s/P along ``dim``, a copy);
        ``cu_seqlens`` (int32 document
        boundaries of the full sequence) is needed by layouts that place tokens by document."""
        if self._single:
            return x.clone()
        return sharding.shard(x, layout=self.layout, group=self.group, dim=dim,
                              ulysses_size=self._inner, cu_seqlens=cu_seqlens)

    def unshard(self, x, dim: int = 1, cu_seqlens=None):
        """This rank's shard along ``dim`` (s/P there) -> the full tensor (s) on every rank, in
        token order: a differentiable all-gather (``ringattn.unshard``); any dtype."""
        if self._single:
            return x
        return sharding.unshard(x, layout=self.layout, group=self.group, dim=dim,
                                ulysses_size=self._inner, cu_seqlens=cu_seqlens)

    def positions(self, seqlen: int, device=None, cu_seqlens=None):
        """RoPE positions of this rank's tokens: global positions, or, for packed
        documents (``cu_seqlens``), positions within each token's document. On ``device``
        (default: the group's, ``self.device``); data preparation, once per step."""
        device = self.device if device is None else device
        if self._single:
            pos = torch.arange(seqlen) if cu_seqlens is None else document_positions(cu_seqlens)
            return pos.to(device)
        if cu_seqlens is None:
            return sharding.positions(seqlen, layout=self.layout, group=self.group, device=device,
                                      ulysses_size=self._inner)
        return self.shard(document_positions(cu_seqlens), dim=0, cu_seqlens=cu_seqlens).to(device)

    def __repr__(self):
        return (f"SequenceParallel(strategy={self.strategy!r}, layout={self.layout!r}, "
                f"world_size={self.world_size}, ring_size={self.ring_size}, "
                f"ulysses_size={self.ulysses_size}, backend={self.backend!r})")


def _resolve_sizes(strategy, p, ring_size, ulysses_size, mesh_ulysses):
    """-> (ring_size, ulysses_size) with ring_size * ulysses_size == p, or ValueError."""
    for name, value in (("ring_size", ring_size), ("ulysses_size", ulysses_size)):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ValueError(f"SequenceParallel: {name} must be a positive int; got {value!r}")
    if strategy in ("ring", "allgather"):
        ring_size = p if ring_size is None else ring_size
        ulysses_size = 1 if ulysses_size is None else ulysses_size
    elif strategy == "ulysses":
        ring_size = 1 if ring_size is None else ring_size
        ulysses_size = p if ulysses_size is None else ulysses_size
    else:
        if ulysses_size is None and ring_size is None:
            if mesh_ulysses is None:
                raise ValueError("strategy='hybrid' needs ring_size or ulysses_size "
                                 "(or a mesh from init_mesh(..., ulysses=u))")
            ulysses_size = mesh_ulysses
        if ulysses_size is None:
            ulysses_size = p // ring_size if p % ring_size == 0 else 0
        if ring_size is None:
            ring_size = p // ulysses_size if p % ulysses_size == 0 else 0
        if mesh_ulysses is not None and ulysses_size != mesh_ulysses:
            raise ValueError(f"strategy='hybrid': ulysses_size={ulysses_size} differs from the "
                             f"mesh's ulysses dim ({mesh_ulysses}); build it with "
                             f"init_mesh(..., ulysses={ulysses_size})")
    if ring_size * ulysses_size != p:
        raise ValueError(
            f"strategy={strategy!r}: ring_size x ulysses_size must equal the sequence-parallel "
            f"size {p}; got ring_size={ring_size or '?'}, ulysses_size={ulysses_size or '?'}"
        )
    return ring_size, ulysses_size
