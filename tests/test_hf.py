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
    return _more_configs(tf, common)[arch]()


def _more_configs(tf, common):
    """The architecture matrix (tests/test_hf_architectures.py). A larger initializer_range
    where it matters: peaked attention, so softcaps and sinks change the result visibly."""
    sharp = dict(common, initializer_range=0.5)
    alternating = ["sliding_attention", "full_attention"]
    return {
        # attention sinks (s_aux), MoE, sliding layers, YaRN RoPE
        "gpt_oss": lambda: tf.GptOssConfig(**sharp, head_dim=8, num_local_experts=4,
                                           num_experts_per_tok=2, sliding_window=5),
        # logit softcapping, sliding layers, query_pre_attn_scalar scaling
        "gemma2": lambda: tf.Gemma2Config(**sharp, head_dim=8, sliding_window=5,
                                          attn_logit_softcapping=2.0, query_pre_attn_scalar=8),
        "gemma3": lambda: tf.Gemma3TextConfig(**common, head_dim=8, sliding_window=5,
                                              layer_types=alternating),
        "mixtral": lambda: tf.MixtralConfig(**common, num_local_experts=4, num_experts_per_tok=2),
        "qwen3_moe": lambda: tf.Qwen3MoeConfig(**common, head_dim=8, num_experts=4,
                                               num_experts_per_tok=2, moe_intermediate_size=16),
        "olmo2": lambda: tf.Olmo2Config(**common),
        "phi3": lambda: tf.Phi3Config(**common, pad_token_id=0),
        "granite": lambda: tf.GraniteConfig(**common, attention_multiplier=0.3),
        "cohere2": lambda: tf.Cohere2Config(**common, sliding_window=5, layer_types=alternating,
                                            pad_token_id=0),
        # a chunked layer (4-token chunks: RangeMask.chunked) and a NoPE full layer
        "llama4": lambda: tf.Llama4TextConfig(**common, head_dim=8, attention_chunk_size=4,
                                              pad_token_id=0, no_rope_layers=[1, 0],
                                              layer_types=["chunked_attention", "full_attention"]),
        # MLA in real-checkpoint proportions: q/k heads of 16 + 8 (nope + rope), v heads of 16,
        # a latent of 8 (DeepSeek-V3: 128 + 64, 128, 512); kv heads = heads (kv_b_proj's)
        "deepseek_v3": lambda: tf.DeepseekV3Config(**_mla(common), n_routed_experts=4,
                                                   num_experts_per_tok=2, n_group=1, topk_group=1,
                                                   first_k_dense_replace=1, moe_intermediate_size=16),
        "longcat_flash": lambda: tf.LongcatFlashConfig(
            **{k: v for k, v in _mla(common).items() if k not in ("intermediate_size",
                                                                  "num_hidden_layers")},
            num_layers=1, head_dim=8, ffn_hidden_size=64, expert_ffn_hidden_size=16,
            n_routed_experts=4, zero_expert_num=2, moe_topk=2),
        # refused by HFCausalLM: token mixing that sp.attention does not do
        "deepseek_v32": lambda: tf.DeepseekV32Config(**_mla(common), n_routed_experts=4,
                                                     num_experts_per_tok=2, n_group=1, topk_group=1,
                                                     moe_intermediate_size=16, index_topk=4,
                                                     index_n_heads=2, index_head_dim=8),
    }


def _mla(common):
    """Multi-head latent attention shapes (v's head size 16 unlike q/k's 24); a larger
    initializer_range, so that RoPE on 8 of the 24 q/k dims visibly moves the logits (the
    local-positions control)."""
    return dict(common, initializer_range=0.2, num_key_value_heads=common["num_attention_heads"], q_lora_rank=16,
                kv_lora_rank=8, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16)


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


def _summed_grad_error(model, ref_grads) -> float:
    """Largest relative error of the parameter gradients summed over ranks vs the reference."""
    import torch.distributed as dist

    err = 0.0
    for n, p in model.named_parameters():
        g = p.grad.clone()
        dist.all_reduce(g)
        err = max(err, _rel(g, ref_grads[n]))
    return err


def _equivalence_cases(rank, world, cases):
    """Run each (arch, strategy, layout, ulysses) case; return {case: {quantity: error}}."""
    import torch.distributed as dist

    import ringattn
    from ringattn.models.hf import HFCausalLM

    results = {}
    for arch, strategy, layout, uly in cases:
        if strategy.endswith("_docs"):  # ring_docs, allgather_docs, ...: packed documents
            results[(arch, strategy, layout, uly)] = _packed_docs_case(
                arch, layout, world, strategy[:-len("_docs")])
            continue
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
        grad_err = _summed_grad_error(model, ref_grads)
        errs = {"logits": _rel(logits.detach(), sp.shard(ref_logits)),
            "loss": abs(loss.item() - ref_loss.item()) / abs(ref_loss.item()),
            "grads": grad_err}
        # negative control: local positions break RoPE (not Llama 4's: its RoPE layers attend
        # within 4-token chunks, which zigzag keeps whole, and RoPE is relative)
        if strategy == "ring" and layout != "contiguous" and arch != "llama4":
            with torch.no_grad():
                wrong = wrapped(x, torch.arange(x.shape[1]))
            errs["local_positions_detected"] = float(_rel(wrong, sp.shard(ref_logits)) < 1e-3)
        results[(arch, strategy, layout, uly)] = errs
    return results


DOCS = [5, 9, 2, 16]  # packed document lengths (32 tokens: splits under every layout, P <= 4)


def _packed_docs_case(arch, layout, world, strategy="ring"):
    """Packed documents through ``cu_seqlens``: positions restart in each document, labels
    never cross a boundary; the reference runs each document through the model on its own.
    Any layout, doc_zigzag (placed by document) included."""
    import torch.distributed as dist

    import ringattn
    from ringattn.models.hf import HFCausalLM

    model = tiny_model(arch)
    seqlen = sum(DOCS)
    tokens = torch.randint(0, VOCAB, (1, seqlen), generator=torch.Generator().manual_seed(2))
    cu = torch.tensor([0, *torch.tensor(DOCS).cumsum(0).tolist()], dtype=torch.int32)
    labels = torch.full_like(tokens, -100)
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        labels[0, a:b - 1] = tokens[0, a + 1:b]
    n_valid = (labels != -100).sum()
    ref_logits = torch.cat([model(input_ids=tokens[:, a:b]).logits
                            for a, b in zip(cu[:-1].tolist(), cu[1:].tolist())], dim=1)
    ref_loss = F.cross_entropy(ref_logits.flatten(0, 1), labels.flatten(), ignore_index=-100,
                               reduction="sum") / n_valid
    ref_loss.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)

    sp = ringattn.SequenceParallel(strategy, layout=layout)
    wrapped = HFCausalLM(model, sp)
    logits = wrapped(sp.shard(tokens, cu_seqlens=cu), sp.positions(seqlen, cu_seqlens=cu), cu)
    loss = F.cross_entropy(logits.flatten(0, 1), sp.shard(labels, cu_seqlens=cu).flatten(),
                           ignore_index=-100, reduction="sum") / n_valid
    loss.backward()
    loss = loss.detach()
    dist.all_reduce(loss)
    grad_err = _summed_grad_error(model, ref_grads)
    return {"logits": _rel(logits.detach(), sp.shard(ref_logits.detach(), cu_seqlens=cu)),
            "loss": abs(loss.item() - ref_loss.item()) / abs(ref_loss.item()), "grads": grad_err}


def _check(results, tol=TOL):
    bad = {case: errs for case, errs in results.items() if max(errs.values()) > tol}
    assert not bad, f"errors above {tol}: {bad}"


def test_equivalence_p2():
    cases = [(a, "ring", lay, 1) for a in ARCHS for lay in LAYOUTS] + [(a, "ulysses", "zigzag", 1) for a in ARCHS]
    cases += [("llama", "ring_docs", "zigzag", 1), ("mistral", "ring_docs", "striped", 1)]
    results = run_distributed(_equivalence_cases, 2, cases, timeout=240)
    for r in results:
        _check(r)


@pytest.mark.slow  # 4 ranks; the quick tier runs the same code at 2
def test_equivalence_p4():
    cases = [(a, "ring", lay, 1) for a in ARCHS for lay in LAYOUTS]
    cases += [("llama", "ulysses", "zigzag", 1), ("qwen2", "hybrid", "zigzag", 2), ("qwen3", "ring_docs", "zigzag", 1)]
    results = run_distributed(_equivalence_cases, 4, cases, timeout=240)
    for r in results:
        _check(r)


# ---- save / reload, recipe, needle evaluation ------------------------------------------------

def test_save_reload_same_logits_and_rope_theta(tmp_path):
    """A (fine-tuned) wrapped model saved with save_pretrained reloads in plain transformers
    (its default attention) with the same logits, and carries the new RoPE theta."""
    from transformers import AutoModelForCausalLM

    from ringattn.models.hf import HFCausalLM, rope_theta

    src = tmp_path / "src"
    tiny_model("qwen3").save_pretrained(src)
    model = HFCausalLM.from_pretrained(str(src), rope_theta=77777.0).eval()
    tokens = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for p in model.parameters():  # stand-in for fine-tuning: weights differ from src
            p.add_(0.01 * torch.randn_like(p))
        logits = model(tokens, torch.arange(24))
    model.save_pretrained(str(tmp_path / "out"))
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["rope_parameters"]["rope_theta"] == 77777.0
    assert config.get("_attn_implementation") in (None, "sdpa", "eager")  # not "ringattn"
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert rope_theta(reloaded.config) == 77777.0
    with torch.no_grad():
        again = reloaded(input_ids=tokens).logits
    assert _rel(again, logits) <= TOL
    with torch.no_grad():  # and the theta matters: the source model (theta 10000) differs
        assert _rel(AutoModelForCausalLM.from_pretrained(src)(input_ids=tokens).logits, logits) > 1e-3


def _save_tiny(arch, path, vocab=272):
    """A tiny model whose vocabulary covers the recipe's byte tokenizer (259 ids)."""
    from transformers import AutoModelForCausalLM

    config = tiny_config(arch)
    config.vocab_size = vocab
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    return str(path)


def _recipe(module, run_dir, nproc, overrides, timeout=240):
    import subprocess
    import sys

    from tests.train_launch import REPO

    args = ["-m", module, *overrides, f"hydra.run.dir={run_dir}"]
    if nproc > 1:
        args = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *args]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "TORCHELASTIC_", "RANK", "LOCAL_RANK",
                                                                     "WORLD_SIZE", "MASTER_"))}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, f"{module} failed\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.mark.slow  # the recipe end to end
def test_recipe_finetunes_hf_model_sp2_zero3_and_saves_it(tmp_path):
    """model=hf through recipes.train: sp=2 under ZeRO-3 (partitioned load) gives the losses of
    one process, and writes a transformers-loadable model with the new RoPE theta."""
    from transformers import AutoModelForCausalLM

    from tests.train_launch import FAST, assert_losses_close, metrics

    path = _save_tiny("mistral", tmp_path / "base")
    over = [o for o in FAST if not o.startswith("model=")]
    over += ["model=hf", f"model.path={path}", "model.rope_theta=50000", "trainer.max_steps=3", "trainer.seed=1"]
    _recipe("recipes.train", tmp_path / "sp1", 1, over)
    _recipe("recipes.train", tmp_path / "sp2", 2, over + ["parallel.sp_size=2", "deepspeed.zero_stage=3"])
    ref, got = metrics(tmp_path / "sp1"), metrics(tmp_path / "sp2")
    assert sorted(ref) == sorted(got) == [1, 2, 3]
    assert_losses_close(ref, got, [1, 2, 3])
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "sp1" / "hf_model")
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "sp2" / "hf_model")
    base = AutoModelForCausalLM.from_pretrained(path)
    assert a.config.rope_parameters["rope_theta"] == b.config.rope_parameters["rope_theta"] == 50000.0
    sa, sb, s0 = a.state_dict(), b.state_dict(), base.state_dict()
    for k in sa:
        assert _rel(sb[k], sa[k]) <= 1e-4, k
    assert max(_rel(sa[k], s0[k]) for k in sa) > 1e-4, "the saved model should be the trained one"


@pytest.mark.slow  # the recipe and the evaluation end to end
def test_needle_eval_end_to_end_hf_sp2(tmp_path):
    """The needle evaluation of a tiny HF model over sp=2 writes its table and heat map."""
    path = _save_tiny("llama", tmp_path / "base")
    out = tmp_path / "needle"
    _recipe("recipes.eval_needle", out, 2, ["model=hf", f"model.path={path}", "parallel.sp_size=2",
                                            "lengths=[32,64]", "depths=[0,0.5,1]", "samples=3", "passkey_digits=1",
                                            f"ppl_file={__file__}"])
    table = json.loads((out / "needle.json").read_text())
    assert table["lengths"] == [32, 64] and table["depths"] == [0, 0.5, 1]
    acc = torch.tensor(table["accuracy"])
    assert acc.shape == (3, 2) and ((acc >= 0) & (acc <= 1)).all()
    assert set(table["perplexity"]) == {"32", "64"} and all(v > 1 for v in table["perplexity"].values())
    assert (out / "needle.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["llama"])  # "hf" passes too (1.0 in every cell), for 50 s more
def test_needle_finds_passkey_after_recipe_training(tmp_path, kind):
    """Our Llama (model=tiny) or a tiny HF Llama (model=hf), trained on the passkey task by
    recipes.train (one process, 200 steps, ~25 s), finds the needle far above chance under
    ring attention over sp=2, at every depth and at twice the trained length. Seen: 1.0 in
    every cell for both (chance 0.1; our Llama also after 200 steps). The HF evaluation path runs end to end in
    test_needle_eval_end_to_end_hf_sp2."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    over = ["data.seq_len=128", "data.passkey_digits=1", "trainer.max_steps=200", "trainer.save_every=200",
            "trainer.eval_every=0", "trainer.log_every=100"]
    if kind == "hf":
        config = LlamaConfig(vocab_size=272, hidden_size=128, intermediate_size=352, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "base")
        over += ["model=hf", f"model.path={tmp_path / 'base'}", "model.rope_theta=20000"]
    run = tmp_path / "train"
    _recipe("recipes.train", run, 1, over, timeout=600)
    out = tmp_path / "needle"
    _recipe("recipes.eval_needle", out, 2, [f"checkpoint={run}", "parallel.sp_size=2", "lengths=[128,256]",
                                            "depths=[0,0.4,1]", "samples=16", "passkey_digits=1"])
    table = json.loads((out / "needle.json").read_text())
    print(f"{kind}: needle accuracy {table['accuracy']} (chance 0.1)")
    assert table["mean_accuracy"] >= 0.8, table  # chance: 0.1
    if kind == "llama":
        # mode=generate (the task format from the checkpoint: no passkey_digits given): greedy
        # generation over the sharded KV cache is right exactly when the teacher-forced argmax
        # is, so the same samples score the same (one sample of slack per cell for a near-tie)
        gen = tmp_path / "needle_generate"
        _recipe("recipes.eval_needle", gen, 2, [f"checkpoint={run}", "parallel.sp_size=2", "lengths=[128,256]",
                                                "depths=[0,0.4,1]", "samples=16", "mode=generate"])
        gtable = json.loads((gen / "needle.json").read_text())
        assert gtable["mode"] == "generate" and gtable["passkey_digits"] == 1
        diff = (torch.tensor(gtable["accuracy"]) - torch.tensor(table["accuracy"])).abs().max()
        assert diff <= 1 / 16, (gtable["accuracy"], table["accuracy"])
        maps = json.loads((out / "attention.json").read_text())
        assert set(maps["needle_mass"]) == {f"{n}/{float(d)}" for n in (128, 256) for d in (0, 0.4, 1)}
        mass = torch.tensor(maps["needle_mass"]["128/0.4"])  # (layers, heads), each in [0, 1]
        assert mass.shape == (2, 4) and ((mass >= 0) & (mass <= 1 + 1e-9)).all()
        for png in ("attention_needle.png", "attention_distance.png"):
            assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bf16_cast_keeps_rope_inverse_frequencies_fp32():
    """DeepSpeed's bf16 casts the whole module; the wrapper keeps RoPE's inv_freq in fp32."""
    from ringattn.models.hf import HFCausalLM

    model = tiny_model("mistral")
    want = model.model.rotary_emb.inv_freq.clone()
    wrapped = HFCausalLM(model).bfloat16()
    assert model.model.rotary_emb.inv_freq.dtype == torch.bfloat16  # what the cast did
    with torch.no_grad():
        out = wrapped(torch.randint(0, VOCAB, (1, 16)), torch.arange(16))
    assert out.dtype == torch.bfloat16
    assert model.model.rotary_emb.inv_freq.dtype == torch.float32
    assert torch.equal(model.model.rotary_emb.inv_freq, want)


@pytest.mark.parametrize("over, message", [
    (["model=hf", "model.path=/no/such/model"], "no config.json there"),
    (["model=hf", "model.path=/no/such/model", "model.dim=64"], "dim"),  # a Llama key: Hydra's error
    (["model=hf"], "path"),  # missing mandatory value
])
def test_recipe_bad_hf_model_input(tmp_path, over, message):
    import subprocess
    import sys

    from tests.train_launch import REPO

    proc = subprocess.run([sys.executable, "-m", "recipes.train", *over, f"hydra.run.dir={tmp_path}"], cwd=REPO,
                          env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and message in proc.stderr + proc.stdout, proc.stderr[-2000:]
    assert not (tmp_path / "checkpoints").exists()


def test_llama4_tiled_loss_reads_the_decoder():
    """Llama 4's ``base_model`` is the whole model (its prefix names no attribute): the tiled
    loss must take the hidden states of its decoder, and equal the untiled loss."""
    from ringattn.models.hf import HFCausalLM

    hf = tiny_model("llama4")
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, hf.config.vocab_size, (1, 32), generator=gen)
    labels = torch.randint(0, hf.config.vocab_size, (1, 32), generator=gen)
    tiled = HFCausalLM(hf)(tokens, torch.arange(32), labels=labels).loss_sum
    plain = HFCausalLM(hf, tiled_loss=False)(tokens, torch.arange(32), labels=labels).loss_sum
    assert torch.allclose(tiled, plain, rtol=1e-5), (tiled, plain)
