"""Attention plans: everything that needs a collective or a host sync, once per step.

Every attention call of a training step (every layer, and again every activation-checkpoint
recompute) sees the same local shape, the same packed-document boundaries and one of a few
(causal, window) rules. What depends only on those is an ``AttentionPlan``:
    that every rank holds equally shaped shards and the same ``cu_seqlens`` (one tiny
    all-gather), the host copy of ``cu_seqlens`` (one host sync), and, built lazily per
    (causal, window) and cached: the mask, the block pairs of each ring step with their
    masks on the device, the ring length, Ulysses' token permutation.
``SequenceParallel.prepare`` makes one per step (a model's forward calls it once) and every
layer passes it on (``sp.attention(..., plan=plan)``); the calls then run with no collective
but the algorithm's own and no host sync. ``ring_attention`` / ``ulysses_attention`` /
``hybrid_attention`` / ``local_attention`` called without a plan make one per call, so
standalone calls keep every check.

The ring length needs no collective: every rank knows the layout and the mask, so each
computes every rank's last non-empty step (host arithmetic) and runs the longest.

A plan lives for one step; it is not a process-wide cache. Were it cached by shape, a rank
whose shape changed would all-gather while a rank whose shape did not would skip it: a
deadlock. Per step, every rank prepares exactly once, so they all meet in the all-gather.

``prologue`` is the one validation prologue of every strategy: local checks of q/k/v, then
either a new plan (with the cross-rank agreement) or a check that the given plan fits.
"""
from __future__ import annotations

import math
from dataclasses import replace

import torch

from .comm import group_device, group_rank, group_size
from .headsplit import HeadSplit
from .inputs import check_qkv, check_same_on_all_ranks, check_sinks, check_ulysses_heads
from .kernels import get_backend
from .layouts import BlockTask, get_layout
from .masking import AttentionMask, check_window, rank_pieces, rank_steps
from .visibility import Runs, calls, pieces, step_pairs
from .rangemask import RangeMask
from .sharding import check_seqlen

# The public strategies (``SequenceParallel``, the recipes' ``parallel.strategy``). A plan
# also takes "local": one process, no communication (``local_attention``).
STRATEGIES = ("ring", "ulysses", "hybrid", "allgather")


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on ``device`` without a host sync (pinned, non-blocking on CUDA)."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _groups_device(groups) -> torch.device | None:
    """The device the groups' collectives take if one needs a device (NCCL: the current
    GPU), else None (the data decides: gloo is happy with any host or device tensor)."""
    for g in groups:
        device = group_device(g)
        if device is not None and device.type != "cpu":
            return device
    return None


class AttentionPlan:
    """What every attention call over one step's shards shares (see the module doc).

    ``strategy``: "local" (one process), "ring" or "allgather" (layout over ``ring_size``
    ranks), "ulysses" (layout over ``ulysses_size`` ranks) or "hybrid" (layout over
    ``ring_size`` ring positions, each split contiguously over ``ulysses_size`` ranks).
    ``batch``, ``local_len``: the (batch, local_seqlen) of every rank's shard.
    ``cu_seqlens``: the validated document boundaries as given (compared by identity in
    ``check``). ``masks``: the ``RangeMask``s this step's calls may use (``mask=``).
    ``device``: where its masks and index tensors live (``prepare`` resolves it).
    Make one with ``AttentionPlan.prepare`` (or ``SequenceParallel.prepare``).
    """

    def __init__(self, strategy: str, layout: str, batch: int, local_len: int, *,
                 ring_size: int = 1, ring_rank: int = 0, ulysses_size: int = 1,
                 cu_seqlens: torch.Tensor | None = None, device=None, masks=()):
        self.strategy, self.layout = strategy, layout
        self.masks = tuple(masks)
        self.batch, self.local_len = batch, local_len
        self.ring_size, self.ring_rank, self.ulysses_size = ring_size, ring_rank, ulysses_size
        self.cu_seqlens = cu_seqlens
        # the host copy: the step's one host sync for documents (checked in prepare)
        self._cu_host = cu_seqlens.to("cpu") if isinstance(cu_seqlens, torch.Tensor) else cu_seqlens
        # where masks and indices live: given, else the first attention call's q device (never
        # a silent host default: host masks would be copied to the GPU on every call)
        self.device = None if device is None else torch.device(device)
        self._cache: dict = {}
        self._host: dict = {}  # rule -> this rank's tasks on the host (the plan's build)
        self._ring_length: dict = {}  # rule -> ring steps every rank runs (ring strategies)
        self._pending = None  # what ``agree`` checks across ranks, until it has

    @property
    def seqlen(self) -> int:
        """Length of the full (packed) sequence."""
        return self.local_len * self.ring_size * self.ulysses_size

    @staticmethod
    def prepare(strategy: str, layout: str, shape, **kw) -> "AttentionPlan":
        """``build`` then ``agree``: the step's plan, checked across ranks (see ``build``)."""
        return AttentionPlan.build(strategy, layout, shape, **kw).agree()

    @staticmethod
    def build(strategy: str, layout: str, shape, *, cu_seqlens=None, device=None,
              ring_group=None, ulysses_group=None, agree_over=None,
              heads: dict[str, int] | None = None, mask=None, rules=None) -> "AttentionPlan":
        """Check and plan ``shape`` = (batch, local_seqlen, ...) shards for ``strategy``, on
        the host, with no communication: any thread may build the next step's plan while
        this step runs (the recipe builds it with the batch). ``agree`` (every rank, before
        the step's first attention call) then makes the step's one collective.

        Groups: ``ring_group`` for "ring"/"hybrid", ``ulysses_group`` for "ulysses"/"hybrid"
        (None = the world, as in torch.distributed). ``agree_over``: the groups whose ranks
        must hold equal shapes and ``cu_seqlens`` (default: the strategy's groups); one
        all-gather each. ``heads``: more named sizes to agree on (standalone calls).
        ``device``: the data's device; None: the groups' (NCCL: the current GPU), else the
        first attention call's q device. The plan then refuses q on any other device.
        ``rules``: the (causal, window_size) pairs the step's calls use (default: causal
        only); each is planned here, before any layer runs, and the ring length each needs
        rides on the agreement all-gather. A rule not given is planned at its first call,
        where the ring length costs a plan of every rank (slow at scale).
        """
        if strategy not in ("local", *STRATEGIES):
            raise ValueError(f"unknown strategy {strategy!r}; choose one of "
                             f"{['local', *STRATEGIES]}")
        get_layout(layout)
        r = group_size(ring_group) if strategy in ("ring", "hybrid", "allgather") else 1
        u = group_size(ulysses_group) if strategy in ("ulysses", "hybrid") else 1
        masks = _range_masks(mask)
        if masks and cu_seqlens is not None:
            raise ValueError("pass documents either as cu_seqlens or inside the RangeMask "
                             "(RangeMask.documents(cu_seqlens), prefix_lm(...), ...), not both")
        batch, local_len = int(shape[0]), int(shape[1])
        if device is None:
            device = _groups_device([g for g, n in ((ring_group, r), (ulysses_group, u)) if n > 1])
        plan = AttentionPlan(strategy, layout, batch, local_len, ring_size=r,
                             ring_rank=group_rank(ring_group) if r > 1 else 0, ulysses_size=u,
                             cu_seqlens=cu_seqlens, device=device, masks=masks)
        if cu_seqlens is not None and batch != 1:
            raise ValueError(f"cu_seqlens (packed documents) needs batch size 1; got {batch}")
        for m in masks:
            m.check_seqlen(plan.seqlen)
        placement = plan._cu_host
        if masks and get_layout(layout).needs_documents:
            placement = masks[0].cu_seqlens
            if any(not torch.equal(m.cu_seqlens, placement) for m in masks[1:]):
                raise ValueError(f"layout {layout!r} places tokens by one mask's segments; the "
                                 "given RangeMasks have different segments (use zigzag)")
        # the layout splits the length (and has the documents it needs); cu_seqlens is valid
        check_seqlen(layout, plan.seqlen, r * u, u if strategy == "hybrid" else 1, placement)
        if agree_over is None:
            agree_over = {"local": [], "ring": [ring_group], "ulysses": [ulysses_group],
                          "hybrid": [ulysses_group, ring_group], "allgather": [ring_group]}[strategy]
        fields = {"batch": batch, "q_len": local_len, **(heads or {})}
        prints = RangeMask.fingerprint(masks)
        # every rule of the step, planned now on the host; its ring length: every rank's own
        # need, maximised by the agreement all-gather the step makes anyway
        declared = masks or tuple(dict.fromkeys(
            (bool(c), check_window(w)) for c, w in (rules or [(True, (-1, -1))])))
        needs = [plan._build(plan._rule_key(r)) for r in declared]
        plan._pending = (agree_over, fields, prints, declared, needs)
        return plan

    def agree(self) -> "AttentionPlan":
        """The step's one collective (an all-gather per agreement group): every rank holds
        equal shapes, the same ``cu_seqlens`` and range masks (else the same ValueError on
        every rank), and each declared rule's ring length is the longest any rank needs.
        Returns the plan; a plan already agreed returns at once."""
        if self._pending is not None:
            agree_over, fields, prints, declared, needs = self._pending
            for group in agree_over:
                needs = check_same_on_all_ranks(fields, group, self._cu_host, prints, needs)
            for rule, need in zip(declared, needs):
                self._ring_length[self._rule_key(rule)] = need
            self._pending = None
        return self

    builds = 0  # plans built, all plans together (tests count them: once per rule per step)

    @staticmethod
    def _rule_key(rule):
        """A rule as given to ``prepare``: a RangeMask, or (causal, window)."""
        return rule if isinstance(rule, RangeMask) else (bool(rule[0]), check_window(rule[1]))

    def _build(self, rule) -> int:
        """Plan ``rule`` for this rank on the host (once) -> the ring steps this rank needs
        (1 when the strategy has no ring)."""
        if rule in self._host:
            return self._host[rule][1]
        AttentionPlan.builds += 1
        mask = rule if isinstance(rule, RangeMask) else self.mask(*rule)
        lay = get_layout(self.layout)
        if self.strategy in ("local", "ulysses"):  # the whole sequence, in position order
            tasks, need = rank_steps(get_layout("contiguous"), mask, 1, 0)[0], 1
        elif self._gathers_in_order():  # this rank's queries against every key, in order
            q = Runs(*lay.runs(self.seqlen, self.ring_size, self.ring_rank, mask.cu_seqlens), 1)
            one = torch.zeros(1, dtype=torch.int64)
            keys = Runs(one, one, torch.tensor([self.seqlen]), 1, one)
            tasks, need = calls(pieces(mask.regions(), q, keys), 1)[0], 1
        else:
            tasks = rank_steps(get_layout(self.layout), mask, self.ring_size, self.ring_rank)
            need = next((s + 1 for s in range(len(tasks) - 1, 0, -1) if tasks[s]), 1)
        self._host[rule] = tasks, need
        return need

    def host_tasks(self, rule):
        """(tasks, need): this rank's block tasks for ``rule`` (a ``RangeMask``, or
        (causal, window_size)) on the host, built once — a list per ring step (ring,
        hybrid), or one list (local and Ulysses: the whole sequence; all-gather: keys in the
        gathered K/V's order) — and the ring steps this rank needs. For planning tools (the
        scale simulator builds plans of any rank of any world with no process group);
        attention uses their device copies."""
        rule = self._rule_key(rule)
        self._build(rule)
        tasks, need = self._host[rule]
        if self.strategy == "allgather" and not self._gathers_in_order():
            tasks = self._gathered(tasks)
        return tasks, need

    def _ring_length_of(self, rule) -> int:
        """Steps every ring rank runs for ``rule``: agreed in prepare, else (a rule nobody
        declared) the longest need of every rank, each planned here."""
        if rule not in self._ring_length:
            lay, p = get_layout(self.layout), self.ring_size
            mask = rule if isinstance(rule, RangeMask) else self.mask(*rule)
            if mask.is_plain and not lay.needs_documents:
                self._ring_length[rule] = p
            else:
                self._ring_length[rule] = max(
                    max((s + 1 for s, n in enumerate(step_pairs(rank_pieces(lay, mask, p, r), p).tolist())
                         if n), default=1) for r in range(p))
        return self._ring_length[rule]

    def check(self, who: str, q: torch.Tensor, strategy: str, layout: str, ring_size: int,
              ulysses_size: int, cu_seqlens, mask=None) -> None:
        """ValueError unless this plan was made for q's shards and this call (no sync)."""
        if self._pending is not None:
            raise ValueError(f"{who}: the plan was built (build / build_plan) but not agreed; "
                             "call plan.agree() on every rank before the step's attention")
        made = (self.strategy, self.layout, self.ring_size, self.ulysses_size)
        if made != (strategy, layout, ring_size, ulysses_size):
            raise ValueError(
                f"{who}: the plan was prepared for (strategy, layout, ring_size, ulysses_size) = "
                f"{made}, but this call is {(strategy, layout, ring_size, ulysses_size)}; "
                "prepare it with the SequenceParallel that runs the attention"
            )
        if self.device is None or (self.device.index is None and self.device.type == q.device.type):
            if self.device != q.device:  # tasks moved before the device was known: again
                self._cache = {k: v for k, v in self._cache.items() if k[0] == "mask"}
            self.device = q.device  # the plan's device is the data's
        elif q.device != self.device:
            raise ValueError(
                f"{who}: q is on {q.device}, but the plan was prepared for {self.device}; "
                "prepare it with device=tokens.device (the data's device)"
            )
        if tuple(q.shape[:2]) != (self.batch, self.local_len):
            raise ValueError(
                f"{who}: q holds (batch, local_seqlen) = {tuple(q.shape[:2])}, but the plan was "
                f"prepared for {(self.batch, self.local_len)}; prepare a plan for these shards"
            )
        if cu_seqlens is not None and cu_seqlens is not self.cu_seqlens:
            raise ValueError(f"{who}: cu_seqlens comes from the plan; pass it to prepare(), "
                             "not to the attention call")
        if mask is not None and mask not in self.masks:
            raise ValueError(f"{who}: this RangeMask was not given to prepare(); prepare the "
                             "step's plan with mask=(every RangeMask its calls use)")

    def mask(self, causal: bool, window_size=(-1, -1), mask: RangeMask | None = None):
        """The visibility rule of a call: its ``RangeMask``, or (causal, window_size) over
        the plan's documents as an ``AttentionMask``."""
        if mask is not None:
            return mask
        key = ("mask", bool(causal), check_window(window_size))
        if key not in self._cache:
            self._cache[key] = AttentionMask.build(self.seqlen, bool(causal), self._cu_host, key[2])
        return self._cache[key]

    @staticmethod
    def _key(kind, causal, window_size, mask):
        return (kind, mask) if mask is not None else (kind, bool(causal), check_window(window_size))

    def _on_device(self, steps: list[list[BlockTask]]) -> list[list[BlockTask]]:
        """Masks and varlen bounds (int32, flash-attn's cu_seqlens) on the device: every
        task's bounds in one host tensor, copied once; each task keeps its views."""
        device = self.device or torch.device("cpu")  # planned before any call: the host
        flat = [t for tasks in steps for t in tasks]
        bounds = [b for t in flat if t.segments is not None for b in t.segments]
        views = iter(())
        if bounds:
            host = torch.tensor([x for b in bounds for x in b], dtype=torch.int32)
            views = iter(torch.split(_to_device(host, device), [len(b) for b in bounds]))
        moved = [replace(t, mask=None if t.mask is None else _to_device(t.mask, device),
                         cu_seqlens=None if t.segments is None else (next(views), next(views)))
                 for t in flat]
        out, at = [], 0
        for tasks in steps:
            out.append(moved[at:at + len(tasks)])
            at += len(tasks)
        return out

    def _tasks(self, kind: str, causal, window_size, mask):
        """This rank's tasks for a rule on the device (built in prepare, or now)."""
        rule = self._rule_key(mask if mask is not None else (causal, window_size))
        key = (kind, rule)
        if key not in self._cache:
            tasks = self.host_tasks(rule)[0]
            steps = tasks[:self._ring_length_of(rule)] if kind == "ring" else [tasks]
            moved = self._on_device(steps)
            self._cache[key] = moved if kind == "ring" else moved[0]
        return self._cache[key]

    def ring_steps(self, causal: bool, window_size=(-1, -1), mask=None) -> list[list[BlockTask]]:
        """The kernel calls of each ring step for this rank, as many steps as any rank needs.

        The ring is ``ring_size`` ranks each holding ``local_len * ulysses_size`` tokens
        (hybrid: the Ulysses all-to-all has gathered the ring position's shard).
        """
        return self._tasks("ring", causal, window_size, mask)

    def local_tasks(self, causal: bool, window_size=(-1, -1), mask=None) -> list[BlockTask]:
        """The kernel calls of attention over the whole sequence in position order."""
        return self._tasks("local", causal, window_size, mask)

    def allgather_tasks(self, causal: bool, window_size=(-1, -1), mask=None) -> list[BlockTask]:
        """The kernel calls of this rank's queries against the all-gathered K/V, which hold
        every rank's shard in rank order: the ring's block tasks of every source rank, with
        key rows moved to that rank's place (no permutation into position order needed, and
        each layout keeps its own block structure, e.g. striped's triangles)."""
        return self._tasks("allgather", causal, window_size, mask)

    def _gathers_in_order(self) -> bool:
        """All-gather attention puts the gathered K/V in position order (``allgather_order``)
        when the layout's runs are contiguous positions: its queries then see one sequence,
        a few varlen calls; striped shards stay in rank order, one step's tasks per rank."""
        return self.strategy == "allgather" and get_layout(self.layout).stride_of(self.ring_size) == 1

    def allgather_order(self) -> torch.Tensor | None:
        """int32 index on the device putting the all-gathered K/V (rank-major: every rank's
        shard in turn) into position order, or None where it already is (contiguous) or
        stays in rank order (striped). Made from the layout's runs: O(S), no sort of S."""
        if not self._gathers_in_order() or self.layout == "contiguous":
            return None
        if "allgather_order" not in self._cache:
            src, pos0, row0, length = get_layout(self.layout).all_runs(
                self.seqlen, self.ring_size, self.masks[0].cu_seqlens if self.masks else self._cu_host)
            by_pos = torch.argsort(pos0)
            start = (src * self.local_len + row0)[by_pos]  # gathered index of each run's start
            length = length[by_pos]
            offsets = torch.cumsum(length, 0) - length
            order = (torch.repeat_interleave(start - offsets, length, output_size=self.seqlen)
                     + torch.arange(self.seqlen))
            self._cache["allgather_order"] = _to_device(order.to(torch.int32),
                                                        self.device or torch.device("cpu"))
        return self._cache["allgather_order"]

    def _gathered(self, steps: list[list[BlockTask]]) -> list[BlockTask]:
        p, rank, n = self.ring_size, self.ring_rank, self.local_len
        tasks = []
        for step, step_tasks in enumerate(steps):
            offset = ((rank - step) % p) * n
            for t in step_tasks:
                a, b, _ = t.k_rows.indices(n)
                tasks.append(replace(t, k_rows=slice(a + offset, b + offset)))
        return tasks

    def gathered_order(self, causal: bool, window_size=(-1, -1), mask=None):
        """(held, order) for Ulysses, or None: held[i] is the position of gathered token i
        (rank-major), ``order`` = argsort(held) sorts them into position order; both on the
        device. None where order does not matter (plain non-causal) or already is positions
        (contiguous, or one rank)."""
        mask = self.mask(causal, window_size, mask)
        if not ((mask.is_range or mask.causal or not mask.is_plain) and self.ulysses_size > 1
                and self.layout != "contiguous"):
            return None
        if "order" not in self._cache:
            u = self.ulysses_size
            lay = get_layout(self.layout)
            held = _to_device(torch.cat([lay.indices(self.seqlen, u, r, mask.cu_seqlens)
                                         for r in range(u)]), self.device)
            self._cache["order"] = held, torch.argsort(held)
        return self._cache["order"]

    def kv_index(self, split: HeadSplit, rank: int) -> torch.Tensor | None:
        """``split.kv_index(rank)`` as an index tensor on the device, made once per plan."""
        key = ("kv_index", split, rank)
        if key not in self._cache:
            index = split.kv_index(rank)
            self._cache[key] = None if index is None else _to_device(torch.tensor(index), self.device)
        return self._cache[key]


def prologue(who: str, q, k, v, *, strategy: str, layout: str, causal: bool, window_size,
             cu_seqlens, dropout_p: float, backend: str, softmax_scale, plan, sinks=None,
             softcap=None, ring_group=None, ulysses_group=None, mask=None):
    """The validation prologue every strategy shares -> (plan, softmax scale, Ulysses
    ``HeadSplit`` or None).

    Local checks of q/k/v (and sinks, softcap, heads, backend) first, with no communication;
    then, without ``plan``, a new plan for this call (its cross-rank checks communicate), or
    with one, a check that it fits (no communication, no host sync).
    """
    check_qkv(q, k, v, dropout_p)
    check_sinks(sinks, q)
    if q.shape[1] != k.shape[1]:
        raise ValueError(
            f"{who} needs equal local q and k/v lengths; got {q.shape[1]} and {k.shape[1]}"
        )
    get_layout(layout)
    check_window(window_size)
    check_range_mask(who, mask, causal, window_size, cu_seqlens)
    u = group_size(ulysses_group) if strategy in ("ulysses", "hybrid") else 1
    r = group_size(ring_group) if strategy in ("ring", "hybrid", "allgather") else 1
    split = check_ulysses_heads(q.shape[2], k.shape[2], u) if strategy in ("ulysses", "hybrid") else None
    get_backend(backend, q, softcap=softcap)  # fail early, before any communication
    if plan is None:
        heads = {"heads": q.shape[2], "head_dim": q.shape[3], "kv_len": k.shape[1],
                 "kv_heads": k.shape[2], "v_head_dim": v.shape[3]}
        plan = AttentionPlan.prepare(strategy, layout, q.shape, cu_seqlens=cu_seqlens,
                                     device=q.device, ring_group=ring_group,
                                     ulysses_group=ulysses_group, heads=heads, mask=mask,
                                     rules=[(causal, window_size)])
    else:
        plan.check(who, q, strategy, layout, r, u, cu_seqlens, mask)
    plan.mask(causal, window_size, mask)  # validates the rule once per plan
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    return plan, scale, split


def _range_masks(mask) -> tuple[RangeMask, ...]:
    masks = () if mask is None else (mask,) if isinstance(mask, RangeMask) else tuple(mask)
    for m in masks:
        if not isinstance(m, RangeMask):
            raise ValueError(f"mask must be a ringattn.RangeMask (or a list of them); got "
                             f"{type(m).__name__}")
    return masks


def check_range_mask(who: str, mask, causal, window_size, cu_seqlens) -> None:
    """A ``RangeMask`` is the whole visibility rule of a call: refuse it beside the others."""
    if mask is None:
        return
    if not isinstance(mask, RangeMask):
        raise ValueError(f"{who}: mask must be a ringattn.RangeMask; got {type(mask).__name__}")
    if causal:
        raise ValueError(f"{who}: mask= (a RangeMask) says which keys each query sees; pass "
                         "causal=False and use slices of kind 'causal' (RangeMask.causal(s), "
                         "RangeMask.documents(cu_seqlens), ...)")
    if check_window(window_size) != (-1, -1):
        raise ValueError(f"{who}: window_size cannot be combined with a RangeMask")
    if cu_seqlens is not None:
        raise ValueError(f"{who}: pass documents either as cu_seqlens or inside the RangeMask "
                         "(RangeMask.documents(cu_seqlens), prefix_lm(...), ...), not both")


__all__ = ["AttentionPlan", "prologue", "check_range_mask"]
