"""Fine-tune a tiny Hugging Face Llama with transformers' ``Trainer`` and sequence parallelism.

    torchrun --standalone --nproc-per-node 2 -m recipes.examples.hf_trainer_sp --sp-size 2
    torchrun --standalone --nproc-per-node 2 -m recipes.examples.hf_trainer_sp --sp-size 2 --packing --grad-accum 2
    torchrun --standalone --nproc-per-node 2 -m recipes.examples.hf_trainer_sp --sp-size 2 --zero 2   # DeepSpeed ZeRO-2
    python -m recipes.examples.hf_trainer_sp --baseline      # the stock Trainer in one process: the reference
    torchrun --standalone --nproc-per-node 2 -m recipes.examples.hf_trainer_sp --sp-size 2 --trl   # TRL SFTTrainer

The model (2-layer Llama) and the byte-level text data are made on the spot (recipes/examples/tiny_hf.py);
nothing is downloaded. ``--trl``: TRL's ``SFTTrainer`` on the raw text with a byte-level
tokenizer and ``padding_free=True`` (documents packed, ``position_ids`` restarting per document). The lines that add sequence parallelism to an ordinary Trainer script
are marked ``# SP``. Rank 0 writes ``<output-dir>/losses.json`` (per-step training losses and
the final eval loss) and the trained model (``save_pretrained`` format) to ``<output-dir>/model``.
"""
from __future__ import annotations

import json
import os

import torch

from recipes.distributed import shutdown
from recipes.examples.tiny_hf import example_arguments, byte_tokenizer, chunked_examples, example_model, packed_examples, texts


def parse(argv=None):
    p = example_arguments(__doc__)
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute layers in backward")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (Trainer's bf16=True)")
    p.add_argument("--zero", type=int, default=None, choices=[0, 1, 2, 3], help="DeepSpeed ZeRO stage")
    p.add_argument("--trl", action="store_true", help="TRL's SFTTrainer (padding-free) instead of Trainer")
    p.add_argument("--baseline", action="store_true",
                   help="the stock Trainer (HF attention and loss), no sequence parallelism")
    p.add_argument("--output-dir", default="runs/hf_trainer_sp")
    return p.parse_args(argv)


def deepspeed_config(stage: int) -> dict:
    # "auto": the Trainer fills these from TrainingArguments (one source of truth)
    return {"train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto",
            "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
            "zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True,
            "bf16": {"enabled": "auto"}, "steps_per_print": 1 << 30}


def cpu_deepspeed_state() -> None:
    """DeepSpeed through the Trainer without a GPU: accelerate finds no process-group backend
    for DeepSpeed on CPU (it would run every process alone), so set up its state here with
    gloo, as ``accelerate launch --use_deepspeed`` would flag it, and let the Trainer use it."""
    from accelerate import PartialState

    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    PartialState(backend="gloo")


def main(argv=None):
    args = parse(argv)
    from transformers import DataCollatorWithFlattening, Trainer, TrainingArguments, default_data_collator

    from ringattn.integrations.transformers import SequenceParallelMixin  # SP

    base, config = Trainer, TrainingArguments
    if args.trl:
        from datasets import Dataset
        from trl import SFTConfig, SFTTrainer

        base, config = SFTTrainer, SFTConfig

    class SPTrainer(SequenceParallelMixin, base):  # SP
        pass

    extra = {}
    if args.trl:  # text in, SFTTrainer tokenises; padding-free = packed documents with position_ids
        train, evals, collator = Dataset.from_dict({"text": texts(256, seed=1)}), \
            Dataset.from_dict({"text": texts(16, seed=2)}), None
        extra = dict(processing_class=byte_tokenizer())
    elif args.packing:
        train, evals, collator = packed_examples(256, seed=1), packed_examples(16, seed=2), DataCollatorWithFlattening()
    else:
        train, evals, collator = chunked_examples(256, 64, seed=1), chunked_examples(16, 64, seed=2), default_data_collator
    if args.zero is not None and not torch.cuda.is_available():
        cpu_deepspeed_state()
    # SFTConfig turns bf16 on by default: set it from --bf16 like the Trainer's
    config_extra = dict(padding_free=True, max_length=None) if args.trl else {}
    targs = config(
        **config_extra, output_dir=args.output_dir, max_steps=args.steps, per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size, gradient_accumulation_steps=args.grad_accum,
        learning_rate=args.lr, adam_epsilon=1e-6, logging_steps=1, save_strategy="no", report_to="none",
        seed=0, dataloader_drop_last=True, bf16=args.bf16, gradient_checkpointing=args.gradient_checkpointing,
        deepspeed=None if args.zero is None else deepspeed_config(args.zero),
        use_cpu=args.zero is None and not torch.cuda.is_available(),  # no GPU: DDP over gloo
        accelerator_config={"use_configured_state": args.zero is not None and not torch.cuda.is_available()},
    )
    model = example_model(args)
    kwargs = dict(model=model, args=targs, train_dataset=train, eval_dataset=evals, data_collator=collator, **extra)
    if args.baseline:
        trainer = base(**kwargs)
    else:
        trainer = SPTrainer(**kwargs, sp_size=args.sp_size, strategy=args.strategy,  # SP
                            layout=args.layout, ulysses_size=args.ulysses_size)
    trainer.train()
    metrics = trainer.evaluate()
    trainer.save_model(os.path.join(args.output_dir, "model"))
    if trainer.is_world_process_zero():
        result = {"losses": [e["loss"] for e in trainer.state.log_history if "loss" in e],
                  "eval_loss": metrics["eval_loss"], "world_size": trainer.args.world_size,
                  "wrapped_model": type(trainer.model_wrapped).__name__}
        with open(os.path.join(args.output_dir, "losses.json"), "w") as f:
            json.dump(result, f)
        print(json.dumps(result))
    return trainer


if __name__ == "__main__":
    main()
    shutdown()  # destroy the process group and free its cycles before interpreter teardown
