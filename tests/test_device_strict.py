"""Device-strict runs: the attention path, the models and generation keep every tensor on the
data's device and never wait for the host, for every strategy x layout x mask feature at
P = 2 and 4 -- proven on CPU with meta tensors and a fake process group (the design and why:
tests/device_strict.py). One process plays one rank of P per case; across the matrix every
rank of each P is played (rank = case index mod P), so each (strategy, layout, feature) runs
once per P rather than P times: the hot path's code is the same on every rank, and the rank
only changes which block pairs (and so which masks) a case meets, which the rotation covers.

Models are built on the meta device with one layer (the path is the same in every layer);
at P = 4 with activation checkpointing, so the recompute runs inside the strict region too.
"""
from __future__ import annotations

import itertools

import pytest
import torch

import ringattn
from ringattn.layouts import LAYOUTS
from ringattn.plan import STRATEGIES
from tests.device_strict import DeviceStrict, DeviceStrictError, fake_world

META = torch.device("meta")
WORLDS = (2, 4)
SEQLEN = 32
DOCS = [0, 10, 23, 32]  # short packed documents: block pairs that documents cut irregularly
FEATURES = ("plain", "documents", "window", "sinks", "softcap")


def _cases(features, every_world=True):
    """(P, rank, strategy, layout, feature), rank rotating over each P's ranks; with
    ``every_world=False`` each combination runs at one P, alternating 2 and 4."""
    combos = list(itertools.product(STRATEGIES, sorted(LAYOUTS), features))
    if not every_world:
        return [(WORLDS[i % 2], (i // 2) % WORLDS[i % 2], *c) for i, c in enumerate(combos)]
    return [(world, i % world, *c) for world in WORLDS for i, c in enumerate(combos)]


def _sp(strategy, layout):
    return ringattn.SequenceParallel(strategy, layout,
                                     ulysses_size=2 if strategy == "hybrid" else None)


def _cu(feature, layout):
    """Host int32 cu_seqlens (documents, or one document where the layout needs them)."""
    if feature == "documents":
        return torch.tensor(DOCS, dtype=torch.int32)
    return torch.tensor([0, SEQLEN], dtype=torch.int32) if LAYOUTS[layout].needs_documents else None


def _step(model, sp, world, cu):
    """One training step's forward + backward of ``model`` on meta tokens, strictly."""
    tokens = torch.zeros(1, SEQLEN // world, dtype=torch.long, device=META)
    positions = sp.positions(SEQLEN, device=META, cu_seqlens=cu)  # data preparation
    with DeviceStrict(META) as strict:
        model(tokens, positions, cu_seqlens=cu, labels=tokens).loss_sum.backward()
    assert strict.ops > 100, "the strict region saw the step's ops"


def _failures(run, cases):
    failed = []
    for case in cases:
        world, rank = case[:2]
        with fake_world(rank, world):
            try:
                run(*case)
            except Exception as e:  # noqa: BLE001 - collect every failing case, then report
                failed.append(f"P={world} rank={rank} {case[2:]}: {type(e).__name__}: {e}")
    return failed


@pytest.mark.slow  # ~20 s; the quick tier keeps the flash adapter's device-strict checks
def test_llama_training_step_and_generation_are_device_strict():
    """ringattn.models.Llama: forward + backward (checkpoint recompute included) with plain
    causal attention, packed documents, and sinks + softcap (Llama has no sliding window:
    windows run in the HF matrix); and greedy and sampled generation (prefill over the group,
    decode over the sharded cache, tokens drawn on the device) on meta. Catches e.g. a CPU ``torch.arange`` on the hot path, a
    ``torch.tensor`` without a device, a ``.tolist()`` of a device tensor."""
    from ringattn.models.generation import generate
    from ringattn.models.llama import Llama, LlamaConfig

    def run(world, rank, strategy, layout, feature):
        sp = _sp(strategy, layout)
        cfg = LlamaConfig(dim=32, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=61,
                          activation_checkpointing=world == 4,  # the recompute, at P = 4
                          attention_sinks=feature == "sinks_softcap",
                          logit_softcap=2.0 if feature == "sinks_softcap" else None)
        with META:
            model = Llama(cfg, sp)
        if feature.startswith("generate"):
            prompt = torch.zeros(2, 8, dtype=torch.long, device=META)
            # sampled: drawn on the device (the device's default generator: meta has no
            # seedable one), no per-token host copy of the probabilities
            sampling = dict(temperature=0.8, top_k=5) if feature == "generate_sampled" else {}
            with DeviceStrict(META):
                out = generate(model, prompt, 2, **sampling)
            assert out.device == META and out.shape == (2, 10)
        else:
            _step(model, sp, world, _cu(feature, layout))

    failed = _failures(run, _cases(("plain", "documents", "sinks_softcap", "generate", "generate_sampled")))
    assert not failed, "\n".join(failed)


def _hf_models():
    """One tiny HF model per feature, on meta, one layer: Llama (plain, documents), Mistral
    (sliding window), Gemma 2 (softcap; its final-logit softcap needs the untiled loss).
    Sinks go through the adapter's attention function alone (``_hf_sinks_step``): the one
    HF architecture with sinks (GPT-OSS) routes its mixture of experts with a data-dependent
    ``nonzero`` in transformers -- a host sync on any device, outside ringattn -- so the
    whole model cannot pass a strict run."""
    from transformers import AutoModelForCausalLM

    from tests.test_hf import tiny_config

    arch = {"plain": "llama", "documents": "llama", "window": "mistral", "softcap": "gemma2"}
    built = {}
    for name in set(arch.values()):
        config = tiny_config(name)
        config.num_hidden_layers = 1
        if hasattr(config, "layer_types"):
            config.layer_types = config.layer_types[:1]
        with META:
            built[name] = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    return {feature: built[a] for feature, a in arch.items()}


def _hf_sinks_step(sp, world, cu):
    """GPT-OSS's attention call as transformers makes it (q/k/v (b, h, s, d), sinks
    ``s_aux``) through ``ringattn_attention_forward``, forward + backward, strictly."""
    from torch import nn

    from ringattn.models.hf import PLAN_KWARG, SP_KWARG, ringattn_attention_forward

    s = SEQLEN // world
    q, k, v = (torch.empty(1, h, s, 8, device=META, requires_grad=True) for h in (4, 2, 2))
    sinks = torch.zeros(4, device=META, requires_grad=True)
    plan = sp.prepare((1, s), cu, device=META)
    with DeviceStrict(META):
        out, _ = ringattn_attention_forward(nn.Module(), q, k, v, None, scaling=0.35, s_aux=sinks,
                                            sliding_window=5, **{SP_KWARG: sp, PLAN_KWARG: plan})
        out.sum().backward()


@pytest.mark.slow  # full suite only: keeps the quick tier under 3 minutes
def test_hf_training_step_is_device_strict():
    """ringattn.models.hf.HFCausalLM over transformers models: forward + backward on meta for
    every strategy x layout x feature (see ``_hf_models`` for which architecture carries each,
    and why sinks run through the adapter's attention function alone). Each combination at one P, alternating 2 and 4 (the
    ranks rotating too): the attention path of every combination at both P is the Llama
    matrix's; this one proves the transformers adapter around it. Without activation
    checkpointing: the Llama matrix runs the recompute, the same forward again."""
    pytest.importorskip("transformers")
    from ringattn.models.hf import HFCausalLM

    models = _hf_models()

    def run(world, rank, strategy, layout, feature):
        sp = _sp(strategy, layout)
        if feature == "sinks":
            return _hf_sinks_step(sp, world, _cu(feature, layout))
        model = HFCausalLM(models[feature], sp, tiled_loss=feature != "softcap")
        model.train()
        _step(model, sp, world, _cu(feature, layout))

    failed = _failures(run, _cases(FEATURES, every_world=False))
    assert not failed, "\n".join(failed)


def _range_masks():
    """Range masks the matrix runs (32 tokens): one prompt shared by three responses, and
    packed documents with bidirectional prefixes (one of length 0)."""
    return {"shared_prefix": ringattn.RangeMask.shared_prefix(10, [9, 1, 12]),
            "prefix_lm": ringattn.RangeMask.prefix_lm(torch.tensor(DOCS), [4, 0, 9])}


@pytest.mark.slow  # full suite only: keeps the quick tier under 3 minutes
def test_range_masks_are_device_strict():
    """``sp.attention(..., mask=RangeMask)`` with the step's plan (``prepare(mask=...)``),
    forward + backward on meta, for every strategy x layout x {shared_prefix, prefix_lm} at
    P = 2 and 4 (ranks rotating); doc_zigzag places tokens by the mask's own documents."""
    masks = _range_masks()

    def run(world, rank, strategy, layout, name):
        sp, mask = _sp(strategy, layout), masks[name]
        s = SEQLEN // world
        q, k, v = (torch.empty(1, s, h, 8, device=META, requires_grad=True) for h in (4, 2, 2))
        plan = sp.prepare((1, s), mask=mask, device=META)
        with DeviceStrict(META) as strict:
            sp.attention(q, k, v, mask=mask, plan=plan).sum().backward()
        assert strict.ops > 20

    failed = _failures(run, _cases(tuple(masks)))
    assert not failed, "\n".join(failed)


@pytest.mark.slow  # full suite only: keeps the quick tier under 3 minutes
def test_llama4_chunked_attention_is_device_strict():
    """transformers' Llama 4 (tiny: a chunked layer, 4-token chunks, and a NoPE full layer)
    through ``HFCausalLM``, with packed documents (the chunks restart at each document; the
    full layer carries the documents as a RangeMask too): a training step on meta for every
    strategy x layout but doc_zigzag (refused by design: one placement for two masks), each
    at one P (2 and 4 alternating, ranks rotating)."""
    pytest.importorskip("transformers")
    from transformers import AutoModelForCausalLM

    from ringattn.models.hf import HFCausalLM
    from tests.test_hf import tiny_config

    config = tiny_config("llama4")
    assert "chunked_attention" in config.layer_types
    with META:
        hf = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    cu = torch.tensor(DOCS, dtype=torch.int32)

    def run(world, rank, strategy, layout, feature):
        sp = _sp(strategy, layout)
        # the untiled loss: Llama4ForCausalLM's base_model is the model itself
        # (base_model_prefix "language_model", attribute "model"), which the tiled loss needs
        model = HFCausalLM(hf, sp, tiled_loss=False)
        model.train()
        _step(model, sp, world, cu)

    cases = [c for c in _cases(("chunked",), every_world=False) if c[3] != "doc_zigzag"]
    failed = _failures(run, cases)
    assert not failed, "\n".join(failed)


# ---- the flash-attn adapter: its real Python package on the CPU stand-in, host mode ----------


def _flash_strict(extra_path, *flags):
    """tests/device_strict_flash.py in its own process (loading the stand-in changes what
    backend="auto" picks), ``extra_path`` first on the path -> its JSON summary."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ)
    paths = [str(p) for p in (extra_path, root) if p is not None]
    env["PYTHONPATH"] = os.pathsep.join(paths + [env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    done = subprocess.run([sys.executable, "-m", "tests.device_strict_flash", *flags], cwd=root,
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _flash_release(path=None):
    from tests.test_flash_attn_standin import _installed

    return _installed(path)


def _check_flash_strict(summary, release, runs):
    assert summary["release"] == release
    assert not summary["failures"], "\n".join(summary["failures"])
    assert summary["runs"] == runs
    # the adapter itself ran every kind of block flash-attn takes, under the checker
    for kind in ("full", "causal", "window", "varlen"):
        assert summary["blocks"].get(f"flash_attn/{kind}", 0) > 0, summary["blocks"]


@pytest.mark.skipif(_flash_release() != "2.8.3",
                    reason="flash-attn 2.8.3 is not installed (bash .ci/run installs it)")
def test_flash_adapter_is_device_strict_and_the_host_mode_catches_planted_faults():
    """backend="flash_attn" (flash-attn 2.8.3's Python package on the CPU stand-in) under
    ring, Ulysses, hybrid and all-gather x every layout x {causal, documents, window + sinks,
    documents + two-sided window + softcap, documents starting just before shard / chunk
    boundaries with windows (the varlen route)}, forward + backward, each combination at one P
    (2 and 4 alternating, ranks rotating), under ``DeviceStrict("cpu")``. The same run with a
    fault planted in the adapter's forward: each is caught (.item(), .tolist(), .cpu(),
    nonzero, boolean-mask indexing, an arange without a device, varlen bounds built from
    Python data)."""
    summary = _flash_strict(None, "--plants")
    _check_flash_strict(summary, "2.8.3", 96)
    missed = [name for name, message in summary["plants"].items() if message is None]
    assert not missed, f"planted faults the checker let through: {missed}"
    assert len(summary["plants"]) == 7


@pytest.mark.slow
@pytest.mark.skipif(_flash_release() != "2.8.3",
                    reason="flash-attn 2.8.3 is not installed (bash .ci/run installs it)")
def test_flash_adapter_is_device_strict_at_every_world():
    _check_flash_strict(_flash_strict(None, "--every-world"), "2.8.3", 192)


def _old_flash():
    from tests.test_flash_attn_standin import OLD_RELEASE

    return OLD_RELEASE


@pytest.mark.slow
@pytest.mark.skipif(_flash_release(_old_flash()) != "2.6.3",
                    reason="flash-attn 2.6.3 is not in .cache (bash .ci/run installs it)")
def test_flash_adapter_and_flash_attn_2_6_glue_are_device_strict():
    """flash-attn 2.6.3 calls its compiled module from plain Python functions (2.7+ from
    custom ops, which the checker sees as one op, as a GPU runs them): here flash-attn's own
    Python glue runs under the checker too."""
    _check_flash_strict(_flash_strict(_old_flash()), "2.6.3", 96)


# ---- the checker itself: it fails on what it must catch --------------------------------


def _ring_step(extra=None):
    """Ring attention forward + backward on meta at P = 2, rank 1, with ``extra(q)`` run
    inside the strict region."""
    with fake_world(1, 2):
        sp = _sp("ring", "zigzag")
        q, k, v = (torch.empty(1, 16, h, 8, device=META, requires_grad=True) for h in (4, 2, 2))
        plan = sp.prepare(q.shape, device=META)
        with DeviceStrict(META):
            out = sp.attention(q, k, v, causal=True, plan=plan)
            if extra is not None:
                out = extra(out)
            out.sum().backward()


def test_checker_passes_the_clean_path_and_fails_on_a_planted_cpu_tensor():
    _ring_step()  # the clean path passes
    with pytest.raises(DeviceStrictError, match="on cpu, not on the data's device meta"):
        _ring_step(lambda out: out * torch.arange(out.shape[-1]).to(META))  # made on the host
    with pytest.raises(DeviceStrictError, match="tensor of Python data"):
        _ring_step(lambda out: out * torch.tensor(2.0))  # a 0-dim host scalar tensor
    with pytest.raises(DeviceStrictError, match="tensor of Python data"):  # no op on meta
        _ring_step(lambda out: out * torch.tensor([2.0], device=out.device))


def test_checker_fails_on_a_planted_host_sync():
    with pytest.raises(DeviceStrictError, match="host sync"):
        _ring_step(lambda out: out * float(out.sum()))
    with pytest.raises(DeviceStrictError, match="host sync"):
        _ring_step(lambda out: out[: out.sum().long().tolist()])


# ---- the plan's device ------------------------------------------------------------------


def test_plan_prepared_without_a_device_keeps_its_masks_on_the_data_device():
    """``sp.prepare(shape, cu_seqlens)`` as the README calls it (no device): the plan takes its
    device from the data (the first attention call's q), so the document masks are moved to
    the device once, not copied from the host in every kernel call; a plan used with q on
    another device is refused with a clear error."""
    with fake_world(0, 2):
        sp = _sp("ring", "striped")
        cu = torch.tensor(DOCS, dtype=torch.int32)
        plan = sp.prepare((1, SEQLEN // 2), cu)
        q, k, v = (torch.empty(1, SEQLEN // 2, h, 8, device=META, requires_grad=True)
                   for h in (4, 2, 2))
        with DeviceStrict(META):
            sp.attention(q, k, v, causal=True, plan=plan).sum().backward()
        assert plan.device == META
        # documents are varlen tasks (their int32 bounds) or masked tiles: both on the device
        moved = [x for tasks in plan.ring_steps(True) for t in tasks
                 for x in (() if t.mask is None else (t.mask,)) + (t.cu_seqlens or ())]
        assert moved and all(x.device == META for x in moved)
        with pytest.raises(ValueError, match="q is on cpu, but the plan was prepared for meta"):
            sp.attention(*(torch.zeros(t.shape) for t in (q, k, v)), causal=True, plan=plan)


def test_positions_default_to_the_group_device():
    """``sp.positions(seqlen)`` without a device: the group's (NCCL: the current GPU, see
    tests/test_gpu.py; gloo and the fake group: the host), never silently the host."""
    with fake_world(1, 2):
        sp = _sp("ring", "zigzag")
        assert sp.device == torch.device("cpu")
        assert sp.positions(SEQLEN).device == sp.device
    with META:  # one process: torch's default device
        single = ringattn.SequenceParallel.single()
        assert single.positions(8).device == META


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["torch_varlen", "fa3"])
def test_torch_varlen_and_fa3_backends_are_device_strict(backend):
    """backend="torch_varlen" (torch's own varlen_attn glue on CPU kernels for its aten ops)
    and "fa3" (on its stand-in module) under ring, Ulysses, hybrid and all-gather x zigzag x
    every mask of tests/device_strict_flash.py, forward + backward, in the host mode: only the
    stand-ins may read their arguments on the host. And the checker is not vacuous here: a
    .item() planted in the backend's forward is caught."""
    from ringattn.kernels import BACKENDS
    from tests.device_strict import DeviceStrictError, fake_world
    from tests.device_strict_flash import matrix, step
    from tests.fa3_standin import fa3_on_cpu
    from tests.torch_flash_standin import torch_flash_on_cpu

    with (torch_flash_on_cpu() if backend == "torch_varlen" else fa3_on_cpu()):
        failures, blocks, runs = matrix(backend=backend, only=lambda P, r, s, layout, m: layout == "zigzag")
        cls = type(BACKENDS[backend])
        original = cls.forward

        def planted(self, q, k, v, **kw):
            float(q.detach().sum())
            return original(self, q, k, v, **kw)

        cls.forward = planted
        try:
            with fake_world(1, 2), pytest.raises(DeviceStrictError):
                step(2, 1, "ring", "zigzag", "documents", backend=backend)
        finally:
            cls.forward = original
    assert not failures, failures[:3]
    assert runs == 24
    for kind in ("full", "causal", "window", "varlen"):
        assert blocks.get(f"{backend}/{kind}", 0) > 0, blocks
