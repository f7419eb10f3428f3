"""Sequence parallelism inside training loops you already have.

- ``ringattn.integrations.accelerate``: ``SequenceParallelism`` for a plain ``accelerate`` loop.
- ``ringattn.integrations.transformers``: ``SequenceParallelMixin`` for ``transformers.Trainer``
  and its subclasses (TRL's ``SFTTrainer``).
- ``ringattn.integrations.batch``: shifting, sharding and the token-weighted loss they share.

Each module imports accelerate / transformers only when used, so ``import ringattn`` needs torch only.
"""
