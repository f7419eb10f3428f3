"""Sequence parallelism in a plain ``accelerate`` training loop.

    accelerator = Accelerator()
    sp = SequenceParallelism(accelerator, sp_size=2, strategy="ring", layout="zigzag")
    model = sp.prepare_model(model)                  # attention -> ringattn
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    loader = sp.data_loader(loader)                  # same batches within an SP group
    for batches in steps(loader, accumulation):      # the full batches of one optimizer step
        n = sp.count_targets(batches)                # valid targets in the global batch
        for i, batch in enumerate(batches):
            with accelerator.no_sync(model) if i < len(batches) - 1 else nullcontext():
                shard = sp.shard(batch)
                logits = model(**sp.model_kwargs(shard)).logits
                loss = sp.loss(logits, shard, n)
                accelerator.backward(loss)
        optimizer.step(); optimizer.zero_grad()

The world is dp x sp ranks (``ringattn.init_mesh``: an SP group is sp consecutive ranks).
Gradients: accelerate (DDP or DeepSpeed) AVERAGES them over all ranks, and divides the
loss by its gradient-accumulation steps G; the SP ranks of a group hold partial gradients
of the same sequences that must be SUMMED. So each rank's loss is its local sum of token
losses x world x G / (valid targets in the global batch): the reduced gradient is then the
gradient of (sum of all token losses) / (valid targets), token-weighted over DP x SP x
accumulation -- the same as one process on the whole batch (see recipes/engine.py).

Needs torch; accelerate is imported by ``data_loader`` only, transformers by
``prepare_model`` (a transformers model). Full loop: ``recipes/examples/accelerate_sp.py``.
"""
from __future__ import annotations

from typing import Iterable, Optional

import torch
import torch.distributed as dist

from ..mesh import init_mesh
from ..parallel import SequenceParallel
from .batch import IGNORE_INDEX, ShardedBatch, count_targets, loss_sum, shard_batch


class SequenceParallelism:
    """DP x SP for the processes of an ``accelerate.Accelerator``.

    sp_size: ranks that share one sequence (dp = world / sp_size). strategy: "ring",
    "allgather" (K/V all-gathered once per layer), "ulysses" or "hybrid" (``ulysses_size`` ranks of all-to-all inside each ring position).
    layout: "zigzag" | "striped" | "contiguous" | "doc_zigzag" (packed documents only).
    ``self.sp`` is the ``SequenceParallel``.
    backward_divides_by_accumulation: whether ``accelerator.backward`` divides the loss by
    ``accelerator.gradient_accumulation_steps`` (True in a plain loop; transformers' Trainer
    accumulates itself and turns DeepSpeed's division off).
    """

    def __init__(self, accelerator, sp_size: int, strategy: str = "ring", layout: str = "zigzag",
                 ulysses_size: Optional[int] = None, backend: str = "auto",
                 backward_divides_by_accumulation: bool = True):
        world = accelerator.num_processes
        if not isinstance(sp_size, int) or sp_size < 1 or world % sp_size:
            raise ValueError(f"sp_size={sp_size!r} must be a positive int dividing the number of processes ({world})")
        if strategy == "hybrid" and ulysses_size is None:
            raise ValueError("strategy='hybrid' needs ulysses_size (Ulysses ranks inside each ring position)")
        self.accelerator = accelerator
        self.mixers = None  # a hybrid's recurrent mixers (``prepare_model``)
        self.backward_divides_by_accumulation = backward_divides_by_accumulation
        self.sp_size, self.dp_size = sp_size, world // sp_size
        uly = {"ring": 1, "allgather": 1, "ulysses": sp_size}.get(strategy, ulysses_size)
        if world == 1:
            self.mesh, self.dp_group, self.dp_rank = None, None, 0
            self.sp = SequenceParallel(strategy, layout, backend=backend)
        else:
            self.mesh = init_mesh(dp=self.dp_size, sp=sp_size, ulysses=uly)
            self.dp_group = self.mesh["dp"].get_group()
            self.dp_rank = self.mesh["dp"].get_local_rank()
            self.sp = SequenceParallel(strategy, layout, mesh=self.mesh, backend=backend)

    @property
    def grad_scale(self) -> int:
        """What accelerate divides gradients by: the world (averaging) x its accumulation steps."""
        accumulation = self.accelerator.gradient_accumulation_steps if self.backward_divides_by_accumulation else 1
        return self.accelerator.num_processes * accumulation

    def prepare_model(self, model):
        """Set a transformers model's attention to ringattn (``attn_implementation="ringattn"``)
        and, for hybrids, put its recurrent mixers under sequence parallelism
        (``ringattn.models.mixers``); ValueError for models whose sequence mixing ringattn does
        not do (``check_supported``)."""
        from ..models.hf import use_ringattn
        from ..models.mixers import SequenceMixers

        hf_model = self.accelerator.unwrap_model(model)
        use_ringattn(hf_model, recurrent_mixers=True)
        if self.mixers is not None:
            self.mixers.remove()
        self.mixers = SequenceMixers(hf_model) or None
        return model

    def data_loader(self, loader):
        """A loader from ``accelerator.prepare`` -> the same loader, sharded over the DP groups
        only: every rank of an SP group gets the same batches, DP groups different ones.

        accelerate shards a map-style dataset's batches over all processes with a
        ``BatchSamplerShard``; its process count and index become the DP size and DP rank
        (what transformers' Trainer itself does for its rank-aware batch samplers).
        """
        from accelerate.data_loader import BatchSamplerShard

        world = self.accelerator.num_processes
        if world == self.dp_size:
            return loader
        shard = getattr(loader, "batch_sampler", None)
        if not isinstance(shard, BatchSamplerShard) or shard.num_processes != world or shard.split_batches:
            raise ValueError(
                "sequence parallelism needs a DataLoader over a map-style dataset prepared by "
                "accelerator.prepare (an IterableDataset, dispatch_batches=True or split_batches=True "
                "is not supported): every rank of an SP group must read the same batches")
        shard.num_processes, shard.process_index = self.dp_size, self.dp_rank
        return loader

    def count_targets(self, batches: Iterable) -> torch.Tensor:
        """Valid targets in the full batches of one optimizer step, summed over the DP groups
        (one all-reduce per step): the denominator of the loss."""
        n = count_targets(batches).to(self.accelerator.device)
        if self.dp_size > 1:
            dist.all_reduce(n, group=self.dp_group)
        return n

    def shard(self, batch, rules=None) -> ShardedBatch:
        """A full batch -> this rank's shard (labels shifted first; see
        ``ringattn.integrations.batch``) with its attention plan, built on the host for
        ``rules`` (``ringattn.models.hf.attention_rules(model.config)``; default: causal)."""
        shard = shard_batch(batch, self.sp, rules)
        if self.mixers is not None:  # the hybrid's mixer permutations, with the attention plan
            shard.mixers = self.mixers.plan(self.sp, shard.input_ids.shape, shard.cu_seqlens,
                                            shard.input_ids.device)
        return shard

    def model_kwargs(self, shard: ShardedBatch) -> dict:
        """Keyword arguments for the model call: local tokens, global positions, the SP front
        door; sets a hybrid's mixer permutations for this forward."""
        if self.mixers is not None:
            self.mixers.use(shard.mixers or self.mixers.plan(
                self.sp, shard.input_ids.shape, shard.cu_seqlens, shard.input_ids.device))
        return shard.model_kwargs(self.sp)

    def loss(self, logits: torch.Tensor, shard: ShardedBatch, num_targets: torch.Tensor) -> torch.Tensor:
        """This rank's loss to backpropagate through ``accelerator.backward`` (see the module doc)."""
        return loss_sum(logits, shard.labels) * self.grad_scale / num_targets

    def mean_loss(self, logits: torch.Tensor, shard: ShardedBatch) -> torch.Tensor:
        """The batch's mean token loss over the SP group (evaluation; one all-reduce)."""
        both = torch.stack([loss_sum(logits, shard.labels), (shard.labels != IGNORE_INDEX).sum().float()])
        if self.sp.world_size > 1:
            dist.all_reduce(both, group=self.sp.group)
        return both[0] / both[1]

    def step_loss(self, losses: torch.Tensor) -> float:
        """The sum of one step's ``loss(...)`` values on this rank -> the step's mean token loss
        over the global batch (one all-reduce; the same on every rank)."""
        total = losses.detach().clone()
        if self.accelerator.num_processes > 1:
            dist.all_reduce(total)
        return total.item() / self.grad_scale
