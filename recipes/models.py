"""Which model a recipe trains or evaluates: our Llama (``model=tiny``, ``llama3_8b``, ...) or a
Hugging Face causal LM from a local path (``model=hf model.path=/local/model``).

Each option of the ``model`` config group names its schema (``llama_schema`` or
``hf_schema``) in its defaults list, so unknown keys stay Hydra errors. Both kinds of model
take ``(tokens, positions, cu_seqlens=None)`` and return logits, so the recipe's data, loss,
parallelism, DeepSpeed, checkpoint and tracking code is the same for both.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass
from typing import Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from ringattn.models import Llama, LlamaConfig

log = logging.getLogger(__name__)

HF_DIRNAME = "hf_model"  # the fine-tuned model, Hugging Face format, in the run directory


@dataclass
class HFModelConfig:
    """A transformers causal LM (Llama, Qwen2/3, Mistral, ...) loaded from a local directory."""

    path: str = MISSING
    rope_theta: Optional[float] = None  # new RoPE base for long context; None: the checkpoint's
    max_position_embeddings: Optional[int] = None  # written to the config; None: the checkpoint's
    activation_checkpointing: bool = False
    save_final: bool = True  # save_pretrained into <run_dir>/hf_model after the last step


ConfigStore.instance().store(group="model", name="llama_schema", node=LlamaConfig)
ConfigStore.instance().store(group="model", name="hf_schema", node=HFModelConfig)


def is_hf(cfg) -> bool:
    return isinstance(cfg, HFModelConfig)


def resolve(cfg, tokenizer):
    """Fill in what comes from elsewhere (the Llama vocabulary from the tokenizer) and check."""
    if is_hf(cfg):
        vocab = _hf_config(cfg).vocab_size
        if vocab < tokenizer.vocab_size:
            raise ValueError(f"model.path={cfg.path}: vocabulary {vocab} < tokenizer vocabulary "
                             f"{tokenizer.vocab_size} (pass the model's tokenizer as data.tokenizer)")
        return cfg
    if cfg.vocab_size is None:
        return dataclasses.replace(cfg, vocab_size=tokenizer.vocab_size)
    if cfg.vocab_size < tokenizer.vocab_size:
        raise ValueError(f"model.vocab_size={cfg.vocab_size} < tokenizer vocabulary {tokenizer.vocab_size}")
    return cfg


def heads(cfg) -> tuple:
    """(query heads, kv heads), for the up-front Ulysses checks."""
    if not is_hf(cfg):
        return cfg.n_heads, cfg.kv_heads
    config = _hf_config(cfg)
    return config.num_attention_heads, getattr(config, "num_key_value_heads", None) or config.num_attention_heads


def _hf_config(cfg: HFModelConfig):
    if not os.path.isfile(os.path.join(cfg.path, "config.json")):
        raise FileNotFoundError(f"model.path={cfg.path!r}: no config.json there (a local Hugging Face "
                                "model directory is needed; nothing is downloaded)")
    from ringattn.models import hf

    return hf.load_config(cfg.path, cfg.rope_theta, cfg.max_position_embeddings)


@dataclass
class HFShape:
    """The numbers the recipe's FLOPs and parameter reporting read from a model config
    (``recipes.train.flops_per_step`` counts the output head as ``vocab_size * dim`` itself)."""

    dim: int  # hidden size (attention FLOPs use it too: exact when heads x head_dim == hidden)
    n_layers: int
    vocab_size: int
    params: int  # all parameters
    embedding_params: int  # input embedding and untied output head

    def num_params(self, include_embedding: bool = True) -> int:
        return self.params if include_embedding else self.params - self.embedding_params


def shape(cfg):
    """``cfg`` itself for our Llama; for HF models the same numbers, from a meta-device model."""
    if not is_hf(cfg):
        return cfg
    from ringattn.models import hf

    config = _hf_config(cfg)
    meta = hf.empty_model(config)
    emb = {id(p): p.numel() for m in (meta.get_input_embeddings(), meta.get_output_embeddings()) if m is not None
           for p in m.parameters()}
    return HFShape(dim=config.hidden_size, n_layers=config.num_hidden_layers, vocab_size=config.vocab_size,
                   params=sum(p.numel() for p in meta.parameters()), embedding_params=sum(emb.values()))


def build(cfg, sp, device, ds_config: dict):
    """The model, on ``device``. HF under ZeRO-3: loaded partitioned (see ringattn.models.hf)."""
    if not is_hf(cfg):
        return Llama(cfg, sp=sp).to(device)
    from ringattn.models.hf import HFCausalLM

    keep = None
    if ds_config.get("zero_optimization", {}).get("stage", 0) == 3:
        from transformers.integrations import HfDeepSpeedConfig

        # While alive, from_pretrained builds the model inside deepspeed.zero.Init (partitioned).
        # zero.Init reads the config before DeepSpeed's own comm is up (it would take the world
        # as 1 and reject train_batch_size); the micro batch and accumulation define it anyway.
        keep = HfDeepSpeedConfig({k: v for k, v in ds_config.items() if k != "train_batch_size"})
    model = HFCausalLM.from_pretrained(cfg.path, sp, rope_theta=cfg.rope_theta,
                                       max_position_embeddings=cfg.max_position_embeddings)
    if keep is not None and sp.rank == 0:
        p = next(model.parameters())
        log.info("ZeRO-3 load: parameter shapes partitioned (first: local %s of %s)",
                 tuple(p.shape), getattr(p, "ds_shape", None))
    del keep
    if cfg.activation_checkpointing:
        model.hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.hf.config.use_cache = False
    return model.to(device)


def full_state_dict(module, zero3: bool, rank: int):
    """The whole state on rank 0 (None elsewhere); ZeRO-3 gathers one parameter at a time."""
    sd = {} if rank == 0 else None
    if zero3:
        import deepspeed

        for name, p in module.named_parameters():
            with deepspeed.zero.GatheredParameters([p]):
                if rank == 0:
                    sd[name] = p.detach().cpu().clone()
        if rank == 0:
            sd.update({n: b.detach().cpu() for n, b in module.named_buffers()})
        return sd
    return {k: v.detach().cpu() for k, v in module.state_dict().items()} if rank == 0 else None


def save_final(engine, cfg, run_dir: str, rank: int) -> Optional[str]:
    """HF models: write ``<run_dir>/hf_model`` (from rank 0), loadable by transformers with the
    new RoPE θ in its config. Weights as trained (bf16 runs save bf16). Collective under ZeRO-3."""
    if not is_hf(cfg) or not cfg.save_final:
        return None
    module = engine.module
    sd = full_state_dict(module.hf, engine.zero_optimization_stage() == 3, rank)
    out = os.path.join(run_dir, HF_DIRNAME)
    if rank == 0:
        module.save_pretrained(out, state_dict=sd)
        log.info("saved the Hugging Face model to %s (rope_theta %s)", out,
                 (module.hf.config.rope_parameters or {}).get("rope_theta"))
    return out
