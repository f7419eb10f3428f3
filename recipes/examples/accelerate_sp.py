"""A plain ``accelerate`` training loop with sequence parallelism (a tiny HF Llama, byte-level text).

    accelerate launch --num_processes 2 --cpu -m recipes.examples.accelerate_sp --sp-size 2
    torchrun --standalone --nproc-per-node 2 -m recipes.examples.accelerate_sp --sp-size 2 --packing --grad-accum 2
    python -m recipes.examples.accelerate_sp --sp-size 1       # one process
    python -m recipes.examples.accelerate_sp --baseline        # the same loop without ringattn (HF attention and loss)

``accelerate launch`` flags: ``--num_processes`` = world = dp x sp; ``--cpu`` runs on CPU with
gloo (on GPUs drop it: one process per GPU, NCCL); add ``--num_machines``/``--machine_rank``/
``--main_process_ip`` for several nodes as usual. Lines that add sequence parallelism to an
ordinary loop are marked ``# SP``. Rank 0 writes ``<output-dir>/losses.json`` (per-step losses)
and the trained model (``save_pretrained``) to ``<output-dir>/model``.
"""
from __future__ import annotations

import json
import os
from contextlib import nullcontext

import torch

from recipes.distributed import shutdown
from recipes.examples.tiny_hf import example_arguments, chunked_examples, example_model, packed_examples


def parse(argv=None):
    p = example_arguments(__doc__)
    p.add_argument("--baseline", action="store_true", help="no sequence parallelism: HF attention and loss")
    p.add_argument("--output-dir", default="runs/accelerate_sp")
    return p.parse_args(argv)


def main(argv=None):
    args = parse(argv)
    from accelerate import Accelerator
    from torch.utils.data import DataLoader
    from transformers import DataCollatorWithFlattening, default_data_collator

    from ringattn.integrations.accelerate import SequenceParallelism  # SP

    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    if args.packing:
        data, collator = packed_examples(256, seed=1), DataCollatorWithFlattening()
    else:
        data, collator = chunked_examples(256, 64, seed=1), default_data_collator
    model = example_model(args)
    if not args.baseline:
        sp = SequenceParallelism(accelerator, args.sp_size, args.strategy, args.layout,  # SP
                                 ulysses_size=args.ulysses_size)
        model = sp.prepare_model(model)  # SP: attention -> ringattn
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, eps=1e-6)
    loader = DataLoader(data, batch_size=args.batch_size, shuffle=True, drop_last=True, collate_fn=collator,
                        generator=torch.Generator().manual_seed(0))
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    if not args.baseline:
        loader = sp.data_loader(loader)  # SP: the same batches on every rank of an SP group

    model.train()  # from_pretrained returns a model in eval mode
    batches_iter = iter(loader)
    losses = []
    for _ in range(args.steps):
        batches = [next(batches_iter) for _ in range(args.grad_accum)]  # one optimizer step
        if args.baseline:
            n = accelerator.reduce(sum((b["labels"][:, 1:] != -100).sum() for b in batches), "sum")
        else:
            n = sp.count_targets(batches)  # SP: valid targets in the global batch
        total = torch.zeros((), device=accelerator.device)
        for i, batch in enumerate(batches):
            with accelerator.no_sync(model) if i < len(batches) - 1 else nullcontext():
                if args.baseline:
                    # use_cache=False: with a cache, transformers ignores packed documents' boundaries
                    out = model(**batch, num_items_in_batch=n, use_cache=False)
                    loss = out.loss * accelerator.num_processes  # DDP averages over ranks
                else:
                    shard = sp.shard(batch)  # SP: labels shifted, then sharded by the layout
                    logits = model(**sp.model_kwargs(shard)).logits  # SP
                    loss = sp.loss(logits, shard, n)  # SP: token-weighted, scaled for accelerate
                accelerator.backward(loss)
            total += loss.detach()
        accelerator.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        if args.baseline:
            step_loss = accelerator.reduce(total, "sum").item() / accelerator.num_processes
        else:
            step_loss = sp.step_loss(total)  # SP
        losses.append(step_loss)
        accelerator.print(f"step {len(losses)} loss {step_loss:.6f}")

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)
        accelerator.unwrap_model(model).save_pretrained(os.path.join(args.output_dir, "model"))
        with open(os.path.join(args.output_dir, "losses.json"), "w") as f:
            json.dump({"losses": losses, "world_size": accelerator.num_processes}, f)


if __name__ == "__main__":
    main()
    shutdown()  # destroy the process group and free its cycles before interpreter teardown
