"""A causal-LM batch of full sequences -> this rank's shard, and the token-weighted loss.

Shared by the accelerate and transformers integrations (needs torch only). The batch is a
dict as Hugging Face collators make it, the same on every rank of a sequence-parallel group:

- ``input_ids`` (b, s) and ``labels`` (b, s) in Hugging Face's convention: the model predicts
  ``labels[t + 1]`` at position t. Labels are shifted here on the *full* sequence, before
  sharding (HF models shift inside the loss, which on a shard would pair tokens with the
  wrong targets), so every rank's shard holds the target of each of its own positions.
- ``position_ids`` (optional): where they restart (the value is not the previous one + 1),
  a new packed document begins -- what ``transformers.DataCollatorWithFlattening`` makes
  (batch 1). The boundaries become int32 ``cu_seqlens``; RoPE gets the positions as given.
- ``attention_mask`` (optional): only right padding (ones, then zeros, per row). Under a
  causal mask no real token sees a later pad, so this is exact; pad tokens get no target.
  Left padding or holes are refused: pack with DataCollatorWithFlattening instead.

The sequence is padded at its end to a multiple of what the layout needs (``-100`` targets;
packed: one more document), which changes no real token's output under a causal mask.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional

import torch
import torch.nn.functional as F

from ..layouts import layout_divisor, layout_needs_documents
from ..models.hf import PLAN_KWARG, SP_KWARG
from ..models.mixers import MixerPlan
from ..plan import AttentionPlan

IGNORE_INDEX = -100
# keys a collator may add that are re-derived here from position_ids (flash-attn kwargs)
_DERIVED_KEYS = frozenset({"cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "seq_idx"})
_KEYS = frozenset({"input_ids", "labels", "position_ids", "attention_mask"})


@dataclass
class ShardedBatch:
    """This rank's part of a batch: input_ids, labels (already shifted), position_ids, all
    (b, s_padded / P); ``cu_seqlens`` int32 boundaries of the full packed sequence or None."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    position_ids: torch.Tensor
    cu_seqlens: Optional[torch.Tensor]
    plan: Optional[AttentionPlan] = None  # built with the batch, on the host (not yet agreed)
    mixers: Optional[MixerPlan] = None  # a hybrid's recurrent-mixer permutations (SequenceParallelism)

    def model_kwargs(self, sp) -> dict:
        """Keyword arguments for a transformers causal LM loaded with ``attn_implementation="ringattn"``:
        the local tokens and positions, ``sp`` and this step's attention plan (built with the
        batch; ``agree`` makes its one small collective here, once per forward, and every
        layer and recompute reuses it)."""
        plan = self.plan or sp.build_plan(self.input_ids.shape, cu_seqlens=self.cu_seqlens,
                                          device=self.input_ids.device)
        return {"input_ids": self.input_ids, "position_ids": self.position_ids, "use_cache": False,
                SP_KWARG: sp, PLAN_KWARG: plan.agree()}


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """(b, s) HF labels -> (b, s) targets: out[:, t] = labels[:, t + 1], the last one ignored."""
    out = torch.full_like(labels, IGNORE_INDEX)
    out[:, :-1] = labels[:, 1:]
    return out


def _check_keys(batch: Mapping) -> None:
    unknown = sorted(set(batch) - _KEYS - _DERIVED_KEYS)
    if unknown:
        raise ValueError(f"sequence-parallel batch: unsupported keys {unknown}; expected input_ids, labels and "
                         "optionally position_ids (packed documents) or a right-padding attention_mask")
    if "input_ids" not in batch or "labels" not in batch:
        raise ValueError("sequence-parallel batch needs 'input_ids' and 'labels' (b, s); e.g. "
                         "DataCollatorWithFlattening, or DataCollatorForLanguageModeling(mlm=False)")


def _masked_labels(batch: Mapping) -> torch.Tensor:
    """Labels with right padding ignored; ValueError for any other padding mask."""
    labels = batch["labels"]
    mask = batch.get("attention_mask")
    if mask is None:
        return labels
    mask = mask.bool()
    # right padding: once a row's mask is 0 it stays 0
    if bool((mask[:, 1:] & ~mask[:, :-1]).any()):
        raise ValueError(
            "sequence-parallel batch: attention_mask with left padding or masked tokens inside a sequence "
            "is not supported (ring attention takes no padding mask); pack the examples with "
            "transformers.DataCollatorWithFlattening instead (or pad on the right)")
    return labels.masked_fill(~mask, IGNORE_INDEX)


def document_starts(position_ids: torch.Tensor) -> torch.Tensor:
    """(s,) positions -> bool (s,): True where a document starts (position not previous + 1)."""
    starts = torch.ones_like(position_ids, dtype=torch.bool)
    starts[1:] = position_ids[1:] != position_ids[:-1] + 1
    return starts


def targets(batch: Mapping) -> torch.Tensor:
    """The batch's shifted targets (b, s); a target of -100 counts for nothing."""
    _check_keys(batch)
    return shift_labels(_masked_labels(batch))


def count_targets(batches) -> torch.Tensor:
    """Number of valid targets (int64 scalar) in full batches: the loss's denominator."""
    return sum((targets(b) != IGNORE_INDEX).sum() for b in batches)


def shard_batch(batch: Mapping, sp, rules=None) -> ShardedBatch:
    """A full batch (the same on every rank of ``sp``'s group) -> this rank's ``ShardedBatch``,
    with its attention plan built on the host for ``rules`` (``models.hf.attention_rules``
    of the model; default: causal), before the forward."""
    labels = targets(batch)
    ids = batch["input_ids"]
    if ids.dim() != 2 or labels.shape != ids.shape:
        raise ValueError(f"sequence-parallel batch: input_ids {tuple(ids.shape)} and labels "
                         f"{tuple(batch['labels'].shape)} must both be (batch, seq)")
    b, s = ids.shape
    pos = batch.get("position_ids")
    cu = None
    if pos is None:
        pos = torch.arange(s, device=ids.device).expand(b, s)
    elif pos.shape != ids.shape:
        raise ValueError(f"sequence-parallel batch: position_ids {tuple(pos.shape)} must match input_ids {(b, s)}")
    else:
        starts = torch.stack([document_starts(row) for row in pos])
        if bool(starts[:, 1:].any()):  # one host sync per micro-batch (data prep, not per layer)
            if b != 1:
                raise ValueError(f"sequence-parallel batch: packed documents (position_ids restart) need batch "
                                 f"size 1, as DataCollatorWithFlattening makes them; got batch {b}")
            cu = torch.cat([starts[0].nonzero().flatten(), torch.tensor([s], device=ids.device)])
    pad = -s % layout_divisor(sp.layout, sp.world_size)
    if pad:
        ids = F.pad(ids, (0, pad))
        labels = F.pad(labels, (0, pad), value=IGNORE_INDEX)
        # packed: the pad is one more document; otherwise it continues the sequence
        tail = torch.arange(pad, device=pos.device) + (0 if cu is not None else s)
        pos = torch.cat([pos, tail.expand(b, pad)], dim=1)
        if cu is not None:
            cu = torch.cat([cu, cu.new_tensor([s + pad])])
    if cu is None and layout_needs_documents(sp.layout):
        if b != 1:
            raise ValueError(f"layout {sp.layout!r} places tokens by document: it needs batch size 1 "
                             f"(packed documents, e.g. DataCollatorWithFlattening); got batch {b}")
        cu = torch.tensor([0, s + pad], device=ids.device)
    if cu is not None:
        cu = cu.to(torch.int32)
    local_ids = sp.shard(ids, dim=1, cu_seqlens=cu)
    plan = sp.build_plan(local_ids.shape, cu_seqlens=cu, device=local_ids.device, rules=rules)
    return ShardedBatch(input_ids=local_ids, labels=sp.shard(labels, dim=1, cu_seqlens=cu),
                        position_ids=sp.shard(pos, dim=1, cu_seqlens=cu), cu_seqlens=cu, plan=plan)


def loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of token cross-entropies (fp32) of local logits (b, s, V) against local targets (b, s)."""
    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX,
                           reduction="sum")
