"""Hugging Face models with ringattn attention (ringattn.models.hf), on CPU with gloo.

Tiny randomly initialised Llama / Qwen2 / Qwen3 / Mistral configs, nothing downloaded.
Equivalence: every rank builds the same model from one seed, computes the reference with
the model's own "eager" attention on the full sequence (one process, no communication),
then runs the ringattn version on its shard (labels shifted on the full sequence, global
position ids) and compares logits, loss and the gradients of one step (summed over ranks)
with the reference: fp32, max-abs error <= 1e-4 of the reference's max-abs.
"""
from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn.functional as F

from tests.distributed import run_distributed

TOL = 1e-4
LAYOUTS = ("contiguous", "zigzag", "striped")
ARCHS = ("llama", "qwen2", "qwen3", "mistral")
VOCAB = 97


def tiny_config(arch: str):
    """Small shapes; GQA 4 -> 2; sliding windows where the architecture has them."""
    import transformers as tf

    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  attention_dropout=0.0)
    if arch == "llama":
        return tf.LlamaConfig(**common, rope_theta=5000.0)
    if arch == "qwen2":  # layer 0 full attention, layer 1 a sliding window of 7
        return tf.Qwen2Config(**common, use_sliding_window=True, sliding_window=7, max_window_layers=1)
    if arch == "qwen3":  # q/k norms, explicit head_dim
        return tf.Qwen3Config(**common, head_dim=16)
    if arch == "mistral":
        return tf.MistralConfig(**common, sliding_window=5)
    raise ValueError(arch)


def tiny_model(arch: str, seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch), attn_implementation="eager")
    return model.float().eval()


def _shift_labels(tokens):
    labels = torch.full_like(tokens, -100)
    labels[:, :-1] = tokens[:, 1:]
    return labels


def _rel(got, want):
    return ((got - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()


def _equivalence_cases(rank, world, cases):
    """Run each (arch, strategy, layout, ulysses) case; return {case: {quantity: error}}."""
    import torch.distributed as dist

    import ringattn
    from ringattn.models.hf import HFCausalLM

    results = {}
    for arch, strategy, layout, uly in cases:
        seqlen = 8 * world
        model = tiny_model(arch)
        gen = torch.Generator().manual_seed(1)
        tokens = torch.randint(0, VOCAB, (2, seqlen), generator=gen)
        # Reference: the model's own eager attention on the full sequence, transformers' loss.
        out = model(input_ids=tokens, labels=tokens)
        out.loss.backward()
        ref_logits, ref_loss = out.logits.detach(), out.loss.detach()
        ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        model.zero_grad(set_to_none=True)

        kw = {"ulysses_size": uly} if strategy == "hybrid" else {}
        sp = ringattn.SequenceParallel(strategy, layout=layout, **kw)
        wrapped = HFCausalLM(model, sp)
        labels = _shift_labels(tokens)  # shifted on the full sequence, then sharded
        x, y = sp.shard(tokens), sp.shard(labels)
        logits = wrapped(x, sp.positions(seqlen))
        n_valid = (labels != -100).sum()
        loss_local = F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-100, reduction="sum")
        (loss_local / n_valid).backward()
        loss = loss_local.detach() / n_valid
        dist.all_reduce(loss)
        grad_err = 0.0
        for n, p in model.named_parameters():
            g = p.grad.clone()
            dist.all_reduce(g)
            grad_err = max(grad_err, _rel(g, ref_grads[n]))
        errs = {"logits": _rel(logits.detach(), sp.shard(ref_logits)),
            "loss": abs(loss.item() - ref_loss.item()) / abs(ref_loss.item()),
            "grads": grad_err}
        if strategy == "ring" and layout != "contiguous":  # negative control: local positions break RoPE
            with torch.no_grad():
                wrong = wrapped(x, torch.arange(x.shape[1]))
            errs["local_positions_detected"] = float(_rel(wrong, sp.shard(ref_logits)) < 1e-3)
        results[(arch, strategy, layout, uly)] = errs
    return results


def _check(results):
    bad = {case: errs for case, errs in results.items() if max(errs.values()) > TOL}
    assert not bad, f"errors above {TOL}: {bad}"


def test_equivalence_p2():
    cases = [(a, "ring", lay, 1) for a in ARCHS for lay in LAYOUTS] + [(a, "ulysses", "zigzag", 1) for a in ARCHS]
    results = run_distributed(_equivalence_cases, 2, cases, timeout=240)
    for r in results:
        _check(r)


def test_equivalence_p4():
    cases = [(a, "ring", lay, 1) for a in ARCHS for lay in LAYOUTS]
    cases += [("llama", "ulysses", "zigzag", 1), ("qwen2", "hybrid", "zigzag", 2)]
    results = run_distributed(_equivalence_cases, 4, cases, timeout=240)
    for r in results:
        _check(r)
