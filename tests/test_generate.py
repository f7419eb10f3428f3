"""Generation over a sharded KV cache equals the single-process full forward at every step.

The logits each new token is chosen from must equal, within 1e-4 of their max-abs (fp32),
the logits of one single-process forward over the whole generated sequence at the same
positions, for sp = 1, 2, 4, every layout, and the other strategies for the prefill. 1e-4:
the two paths sum the same fp32 products in different orders through a few layers (~1e-6
observed); a K/V in the wrong cache part, a wrong RoPE position or a lost token is ~1e-1.
"""
from __future__ import annotations

import pytest
import torch

import ringattn
from ringattn.models import KVCache, Llama, LlamaConfig, generate
from ringattn.models.generation import _sample
from tests.distributed import run_distributed, worlds
from tests.reference import rel_err

TOL = 1e-4
LAYOUTS = ("contiguous", "zigzag", "striped", "doc_zigzag")  # doc_zigzag: the prompt is one document


def _model(sp=None, features=False):
    """The same weights whatever sp; ``features``: attention sinks (random logits) and softcap."""
    torch.manual_seed(0)
    extra = dict(attention_sinks=True, logit_softcap=1.5) if features else {}
    cfg = LlamaConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=40, init_std=0.3,
                      multiple_of=16, **extra)
    model = Llama(cfg, sp).eval()
    if features:
        with torch.no_grad():
            for layer in model.layers:
                layer.attention.sinks.copy_(torch.randn(4, generator=torch.Generator().manual_seed(1)))
    return model


def _prompt(n, batch=2):
    return torch.randint(0, 40, (batch, n), generator=torch.Generator().manual_seed(n))


def _errors(model, prompt, **kw):
    """Max error of every step's logits vs one full forward; the generated tokens."""
    tokens, logits = generate(model, prompt, 6, return_logits=True, **kw)
    ref = _model(features=model.cfg.attention_sinks)  # same seed, same weights, no SP
    n = prompt.shape[1]
    with torch.no_grad():
        full = ref(tokens[:, :-1], torch.arange(tokens.shape[1] - 1))[:, n - 1:]
    return rel_err(logits, full.double()), tokens


def _world(rank, world):
    results = []
    combos = [("ring", lay, {}) for lay in LAYOUTS]
    combos.append(("ulysses", "zigzag", {}) if world == 2 else ("hybrid", "zigzag", {"ulysses_size": 2}))
    for strategy, layout, extra in combos:
        sp = ringattn.SequenceParallel(strategy, layout=layout, **extra)
        model = _model(sp)
        # 16: whole prompt prefilled; 13: the remainder past the layout's divisor decodes;
        # 3 (< P at world 4 for zigzag): nothing to prefill, every token decodes.
        for n in (16, 13, 3):
            err, tokens = _errors(model, _prompt(n))
            results.append((strategy, layout, n, "greedy", err, tokens))
        gen = torch.Generator().manual_seed(7)  # the same seed on every rank (the data's device)
        err, tokens = _errors(model, _prompt(16), temperature=1.0, top_k=8, generator=gen)
        results.append((strategy, layout, 16, "sampled", err, tokens))
        # each rank's own draw (before rank 0's is broadcast) is rank 0's: same seed, same probabilities
        own = _sample(torch.softmax(torch.randn(3, 40, generator=torch.Generator().manual_seed(2)), -1),
                      torch.Generator().manual_seed(11))
        results.append((strategy, layout, 0, "own draw", 0.0, own))
        if layout == "zigzag" and strategy == "ring":
            err, tokens = _errors(_model(sp, features=True), _prompt(13))
            results.append((strategy, layout, 13, "sinks+softcap", err, tokens))
    return results


@pytest.mark.parametrize("world", worlds(2, 4))
def test_generation_equals_full_forward(world):
    per_rank = run_distributed(_world, world, timeout=300)
    for rank_results in per_rank:
        for strategy, layout, n, mode, err, _ in rank_results:
            assert err <= TOL, (strategy, layout, n, mode, err)
    for i in range(len(per_rank[0])):  # every rank generated the same tokens
        assert all(torch.equal(r[i][-1], per_rank[0][i][-1]) for r in per_rank)


def test_generation_single_process():
    for n in (1, 9):
        err, tokens = _errors(_model(), _prompt(n))
        assert err <= TOL and tokens.shape == (2, n + 6)
    gen = torch.Generator().manual_seed(0)
    err, _ = _errors(_model(), _prompt(5), temperature=0.7, generator=gen)
    assert err <= TOL
    err, _ = _errors(_model(features=True), _prompt(7))
    assert err <= TOL


def test_device_sampling_draws_each_token_with_its_probability():
    """The on-device sampler (exponential race) picks index i with probability p_i, never one
    top-k removed, and a seeded generator repeats its draws. 40000 rows of one distribution
    over 6 tokens (two of them 0): each frequency within 5 standard errors of p_i."""
    probs = torch.tensor([0.5, 0.25, 0.0, 0.15, 0.1, 0.0]).expand(40000, 6)
    draws = _sample(probs, torch.Generator().manual_seed(3))
    freq = torch.bincount(draws.flatten(), minlength=6).double() / len(draws)
    se = (probs[0] * (1 - probs[0]) / len(draws)).sqrt().double()
    assert ((freq - probs[0].double()).abs() <= 5 * se + 1e-12).all(), freq
    assert freq[2] == freq[5] == 0
    assert torch.equal(draws, _sample(probs, torch.Generator().manual_seed(3)))
    assert not torch.equal(draws, _sample(probs, torch.Generator().manual_seed(4)))


def test_a_generator_off_the_models_device_is_refused():
    with torch.device("meta"):
        model = _model()
    prompt = torch.zeros(1, 4, dtype=torch.long, device="meta")
    with pytest.raises(ValueError, match="generator is on cpu, the prompt on meta"):
        generate(model, prompt, 2, temperature=1.0, generator=torch.Generator())


def test_kv_cache_owner_is_shortest_part():
    cache = KVCache(n_layers=1, world_size=3, rank=0)
    owners = []
    for _ in range(5):
        owners.append(cache.owner())
        cache.advance(owners[-1], 1)
    assert owners == [0, 1, 2, 0, 1]
    cache.advance(2, 4)
    assert cache.owner() == 0 and cache.lengths == [2, 2, 5]


def test_generate_refuses_bad_input():
    model = _model()
    with pytest.raises(ValueError, match="non-empty"):
        generate(model, torch.zeros(2, 0, dtype=torch.long), 3)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, _prompt(4), 0)
    with pytest.raises(ValueError, match="Hugging Face models are refused"):
        generate(torch.nn.Linear(2, 2), _prompt(4), 3)
