"""Sequence parallelism for a Hugging Face ``Trainer`` (or a subclass such as TRL's ``SFTTrainer``).

    from transformers import Trainer, DataCollatorWithFlattening
    from ringattn.integrations.transformers import SequenceParallelMixin

    class SPTrainer(SequenceParallelMixin, Trainer):      # or (SequenceParallelMixin, SFTTrainer)
        pass

    trainer = SPTrainer(model=model, args=args, train_dataset=ds,
                        data_collator=DataCollatorWithFlattening(),
                        sp_size=2, strategy="ring", layout="zigzag")
    trainer.train()                                      # torchrun / accelerate launch, world = dp x sp

The mixin overrides public Trainer methods only (the ones its documentation says to
subclass): ``get_train_dataloader`` / ``get_eval_dataloader`` (every rank of an SP group
reads the same batches, DP groups different ones: ``SequenceParallelism.data_loader``),
``get_batch_samples`` (counts the valid targets of the whole optimizer step over the DP
groups, once per step), ``compute_loss`` (shifts labels on the full sequence, shards the
batch by the layout, runs the model with ringattn attention on local tokens and global
positions, and returns the token-weighted loss scaled so that the Trainer's averaging over
all ranks gives the gradient and logged loss of one process on the whole batch) and
``prediction_step`` (evaluation loss over the SP group). The model's attention is set to
``"ringattn"`` through transformers' ``AttentionInterface``. Logging and ``save_model``
stay the Trainer's own (main process only); the saved model is a plain HF model.

Not supported (clear errors): padding masks other than right padding (pack with
``DataCollatorWithFlattening``), ``compute_metrics`` / prediction logits (each rank holds
a shard of the logits), label smoothing, a ``compute_loss_func``, IterableDatasets.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..models.hf import attention_rules
from .accelerate import SequenceParallelism


class SequenceParallelMixin:
    """Put first in the bases of a ``transformers.Trainer`` subclass (see the module doc).

    Keyword arguments (the rest go to the Trainer), named as in ``SequenceParallelism`` and
    ``ringattn.SequenceParallel``: sp_size (ranks sharing one sequence), strategy ("ring" |
    "allgather" | "ulysses" | "hybrid"), layout ("zigzag" | "striped" | "contiguous" | "doc_zigzag"),
    ulysses_size (hybrid), backend (kernel backend).
    """

    # compute_loss returns a loss already normalised over the whole accumulated batch
    loss_is_scaled_for_ga = True

    def __init__(self, *args, sp_size: int = 1, strategy: str = "ring", layout: str = "zigzag",
                 ulysses_size: Optional[int] = None, backend: str = "auto", **kwargs):
        for old in ("sp_strategy", "sp_layout", "sp_ulysses_size", "sp_backend"):
            if old in kwargs:
                raise TypeError(f"SequenceParallelMixin: {old}= was renamed {old[3:]}=")
        super().__init__(*args, **kwargs)
        if self.args.label_smoothing_factor:
            raise ValueError("sequence parallelism: label_smoothing_factor is not supported; set it to 0")
        if getattr(self, "compute_loss_func", None) is not None:
            raise ValueError("sequence parallelism computes the loss itself; compute_loss_func is not supported")
        if self.compute_metrics is not None:
            raise ValueError("sequence parallelism: compute_metrics is not supported (each rank holds only a "
                             "shard of the logits); evaluation reports eval_loss")
        self.sequence_parallelism = SequenceParallelism(self.accelerator, sp_size, strategy, layout,
                                                        ulysses_size=ulysses_size, backend=backend,
                                                        backward_divides_by_accumulation=False)
        self.sequence_parallelism.prepare_model(self.model)

    def get_train_dataloader(self):
        return self.sequence_parallelism.data_loader(super().get_train_dataloader())

    def get_eval_dataloader(self, eval_dataset=None):
        return self.sequence_parallelism.data_loader(super().get_eval_dataloader(eval_dataset))

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """One optimizer step's batches and their valid-target count over the global batch."""
        batches = []
        for _ in range(num_batches):
            try:
                batches.append(next(epoch_iterator))
            except StopIteration:
                break
        if not batches:
            return batches, None
        return batches, self.sequence_parallelism.count_targets(batches)

    def compute_loss(self, model, inputs, return_outputs: bool = False, num_items_in_batch=None):
        """Training: local token-loss sum x world / valid targets of the global batch (the
        gradient and the Trainer's logged mean over ranks are then exact). Evaluation: the
        batch's mean token loss over the SP group."""
        spm = self.sequence_parallelism
        shard = spm.shard(inputs, rules=attention_rules(self.accelerator.unwrap_model(model).config))
        outputs = model(**spm.model_kwargs(shard))
        if model.training:
            if num_items_in_batch is None:
                raise RuntimeError("SequenceParallelMixin.compute_loss needs the step's target count "
                                   "(from get_batch_samples)")
            loss = spm.loss(outputs.logits, shard, num_items_in_batch)
        else:
            loss = spm.mean_loss(outputs.logits, shard)
        return (loss, outputs) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """Evaluation: (mean token loss of the batch over the SP group, None, None)."""
        with torch.no_grad():  # batches arrive on the device (accelerate's prepared loader)
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None
