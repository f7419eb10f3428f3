"""Which model a recipe trains or evaluates: our Llama (``model=tiny``, ``llama3_8b``, ...) or a
Hugging Face causal LM from a local path (``model=hf model.path=/local/model``).

Each option of the ``model`` config group names its schema (``llama_schema`` or
``hf_schema``) in its defaults list, so unknown keys stay Hydra errors. Both kinds of model
take ``(tokens, positions, cu_seqlens=None, labels=None)`` and return logits, or with labels
the token-loss sum and correct count over sequence tiles (``ringattn.models.tiling``), so the
recipe's data, loss,
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

from recipes import flops
from ringattn.models import Llama, LlamaConfig
from ringattn.models.tiling import check_memory_options

log = logging.getLogger(__name__)

HF_DIRNAME = "hf_model"  # the fine-tuned model, Hugging Face format, in the run directory


@dataclass
class HFModelConfig:
    """A transformers causal LM (Llama, Qwen2/3, Mistral, ...) loaded from a local directory."""

    path: str = MISSING
    rope_theta: Optional[float] = None  # new RoPE base for long context; None: the checkpoint's
    max_position_embeddings: Optional[int] = None  # written to the config; None: the checkpoint's
    activation_checkpointing: bool = False
    # the options of ringattn.models.LlamaConfig, same meaning (ringattn.models.tiling):
    offload_activations: bool = False  # checkpointed layer inputs in pinned host memory (CUDA)
    tiled_loss: bool = True  # head + loss over sequence tiles, full logits never materialised
    loss_tile_tokens: Optional[int] = None  # None: fp32 tile logits of ~256 MiB
    tiled_mlp: bool = False  # each decoder layer's `mlp` over sequence tiles, recomputed in backward
    mlp_tile_tokens: Optional[int] = None  # None: a tile's ffn-wide tensors ~256 MiB
    save_final: bool = True  # save_pretrained into <run_dir>/hf_model after the last step


ConfigStore.instance().store(group="model", name="llama_schema", node=LlamaConfig)
ConfigStore.instance().store(group="model", name="hf_schema", node=HFModelConfig)


def is_hf(cfg) -> bool:
    return isinstance(cfg, HFModelConfig)


@dataclass(frozen=True)
class ModelShape:
    """The numbers FLOPs, parameter reporting and the memory estimate read, the same for both kinds."""

    dim: int  # hidden size
    n_layers: int
    vocab_size: int
    kv_dim: int  # kv heads x head dim: the width of K and V
    ffn_dim: int
    params: int  # all parameters
    embedding_params: int  # input embedding and untied output head

    def num_params(self, include_embedding: bool = True) -> int:
        return self.params if include_embedding else self.params - self.embedding_params

    def flops_per_step(self, global_batch: int, seq_len: int) -> float:
        """Model FLOPs of one optimizer step (``recipes.flops``: backward = 2x forward): 6 N per
        token for the matmuls (embedding lookup excluded, output head included) plus causal
        attention over all layers (heads x head_dim taken as dim)."""
        n = self.num_params(include_embedding=False) + self.vocab_size * self.dim
        return (flops.model_flops(n, global_batch * seq_len)
                + self.n_layers * flops.attention_flops(global_batch, seq_len, 1, self.dim, causal=True,
                                                        backward=True))


def _zero3_config(ds_config: dict) -> Optional[dict]:
    """The DeepSpeed config for ``zero.Init`` under ZeRO-3, else None. zero.Init reads it before
    DeepSpeed's own comm is up (it would take the world as 1 and reject train_batch_size); the
    micro batch and accumulation define it anyway."""
    if ds_config.get("zero_optimization", {}).get("stage", 0) != 3:
        return None
    return {k: v for k, v in ds_config.items() if k != "train_batch_size"}


def _log_partitioned(model, sp) -> None:
    if sp.rank == 0:
        p = next(model.parameters())
        log.info("ZeRO-3 build: parameters partitioned as built (first: local %s of %s)",
                 tuple(getattr(p, "ds_tensor", p).shape), getattr(p, "ds_shape", None))


class LlamaModel:
    """Our Llama (``ringattn.models.Llama``) from its resolved config."""

    def __init__(self, cfg: LlamaConfig):
        cfg.validate()
        self.cfg = cfg

    @property
    def heads(self) -> tuple:
        """(query heads, kv heads)."""
        return self.cfg.n_heads, self.cfg.kv_heads

    @property
    def activation_checkpointing(self) -> bool:
        return self.cfg.activation_checkpointing

    recurrent_mixers: tuple = ()  # attention only

    def mixer_memory(self, dtype: str, world: int) -> None:
        return None  # attention only

    @property
    def shape(self) -> ModelShape:
        c = self.cfg
        return ModelShape(dim=c.dim, n_layers=c.n_layers, vocab_size=c.vocab_size, kv_dim=c.kv_heads * c.head_dim,
                          ffn_dim=c.ffn_dim, params=c.num_params(),
                          embedding_params=c.num_params() - c.num_params(include_embedding=False))

    def build(self, sp, device, ds_config: dict):
        """The model, on ``device``. Under ZeRO-3 built inside ``deepspeed.zero.Init``: each module
        is partitioned as soon as it is built, so no rank ever holds the whole model."""
        zero3 = _zero3_config(ds_config)
        if zero3 is None:
            return Llama(self.cfg, sp=sp).to(device)
        import deepspeed

        with deepspeed.zero.Init(config_dict_or_path=zero3):
            model = Llama(self.cfg, sp=sp)
        _log_partitioned(model, sp)
        return model.to(device)

    def save_final(self, engine, run_dir: str, rank: int) -> Optional[str]:
        """Nothing beyond the DeepSpeed checkpoints."""
        return None


class HFModel:
    """A transformers causal LM from a local directory; its config is read once."""

    def __init__(self, cfg: HFModelConfig, tokenizer):
        check_memory_options(cfg)
        if not os.path.isfile(os.path.join(cfg.path, "config.json")):
            raise FileNotFoundError(f"model.path={cfg.path!r}: no config.json there (a local Hugging Face "
                                    "model directory is needed; nothing is downloaded)")
        from ringattn.models import hf

        self.cfg = cfg
        self.config = hf.load_config(cfg.path, cfg.rope_theta, cfg.max_position_embeddings)
        if self.config.vocab_size < tokenizer.vocab_size:
            raise ValueError(f"model.path={cfg.path}: vocabulary {self.config.vocab_size} < tokenizer vocabulary "
                             f"{tokenizer.vocab_size} (pass the model's tokenizer as data.tokenizer)")
        self._shape = None
        self._mixers = None
        self._mixer_cost = {}  # dtype -> measured mixer layers (``mixer_memory``)

    @property
    def recurrent_mixers(self) -> tuple:
        """Families of the model's recurrent mixers (``ringattn.models.mixers``; empty unless a
        hybrid), from a meta-device model, computed once."""
        if self._mixers is None:
            from ringattn.models import hf, mixers

            found = mixers.find_mixers(hf.empty_model(self.config)).values()
            self._mixers = tuple(sorted({mixers.MIXER_CLASSES[type(m).__name__] for m in found}))
        return self._mixers

    def mixer_memory(self, dtype: str, world: int):
        """``recipes.mixer_memory.MixerMemory`` of this hybrid over ``world`` SP ranks in ``dtype``
        ("fp32" / "bf16"), None for attention-only models. The mixers are measured once per
        dtype (one layer of each mixer class, real widths, on this machine's GPU if it has one,
        else its CPU: seconds)."""
        if not self.recurrent_mixers:
            return None
        import torch

        from recipes import mixer_memory
        from ringattn.models import hf, mixers
        from ringattn.models.mixer_heads import HEAD_PARALLEL, head_split, work_share

        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if dtype not in self._mixer_cost:
            meta = hf.empty_model(self.config)
            found = mixers.find_mixers(meta)
            costs, one = [], {}
            for module in found.values():
                one.setdefault(type(module), module)
            for module in one.values():
                mixer_memory.materialize(module)
                costs.append(mixer_memory.measure(module, self.config.hidden_size,
                                                  torch.bfloat16 if dtype == "bf16" else torch.float32, device))
                module.to("meta")  # its memory back at once (a real-width layer holds GiBs)
            self._mixer_cost[dtype] = (tuple(one.values()), len(mixers.mixer_layers(meta)),
                                       tuple(max(c[i] for c in costs) for i in range(3)),
                                       mixers.attention_beside_mixer(meta))
        modules, layers, cost, beside = self._mixer_cost[dtype]

        def factor(module):  # tokens run per local token on the busiest rank
            name = type(module).__name__
            if mixers.MIXER_CLASSES[name] in mixers.HALO_REACH or world == 1:
                return 1.0
            split = head_split(module, world) if name in HEAD_PARALLEL else None
            if split is None:
                return float(world)  # the gathered sequence, every head
            return work_share(module, split)

        return mixer_memory.MixerMemory(self.recurrent_mixers, layers, *cost, device.type,
                                        max(factor(m) for m in modules), beside)

    @property
    def heads(self) -> tuple:
        c = self.config
        return c.num_attention_heads, getattr(c, "num_key_value_heads", None) or c.num_attention_heads

    @property
    def activation_checkpointing(self) -> bool:
        return self.cfg.activation_checkpointing

    @property
    def shape(self) -> ModelShape:
        """From a meta-device model (no memory), computed once."""
        if self._shape is None:
            from ringattn.models import hf

            c = self.config
            meta = hf.empty_model(c)
            emb = {id(p): p.numel() for m in (meta.get_input_embeddings(), meta.get_output_embeddings())
                   if m is not None for p in m.parameters()}
            n_heads, kv_heads = self.heads
            head_dim = getattr(c, "head_dim", None) or c.hidden_size // n_heads
            self._shape = ModelShape(dim=c.hidden_size, n_layers=c.num_hidden_layers, vocab_size=c.vocab_size,
                                     kv_dim=kv_heads * head_dim,
                                     ffn_dim=getattr(c, "intermediate_size", None) or 4 * c.hidden_size,
                                     params=sum(p.numel() for p in meta.parameters()),
                                     embedding_params=sum(emb.values()))
        return self._shape

    def build(self, sp, device, ds_config: dict):
        """The model, on ``device``. Under ZeRO-3: loaded partitioned (see ringattn.models.hf)."""
        from ringattn.models.hf import HFCausalLM

        cfg, keep = self.cfg, None
        zero3 = _zero3_config(ds_config)
        if zero3 is not None:
            from transformers.integrations import HfDeepSpeedConfig

            keep = HfDeepSpeedConfig(zero3)  # while alive, from_pretrained builds inside deepspeed.zero.Init
        model = HFCausalLM.from_pretrained(cfg.path, sp, rope_theta=cfg.rope_theta,
                                           max_position_embeddings=cfg.max_position_embeddings,
                                           tiled_loss=cfg.tiled_loss, loss_tile_tokens=cfg.loss_tile_tokens,
                                           offload_activations=cfg.offload_activations)
        if keep is not None:
            _log_partitioned(model, sp)
        del keep
        if cfg.activation_checkpointing:
            model.enable_checkpointing()
        if cfg.tiled_mlp:
            model.tile_mlps(cfg.mlp_tile_tokens)
        model.hf.config.use_cache = False
        return model.to(device)

    def save_final(self, engine, run_dir: str, rank: int) -> Optional[str]:
        """Write ``<run_dir>/hf_model`` (from rank 0), loadable by transformers with the new RoPE θ
        in its config. Weights as trained (bf16 runs save bf16). Collective under ZeRO-3."""
        if not self.cfg.save_final:
            return None
        module = engine.module
        sd = full_state_dict(module.hf, engine.zero_optimization_stage() == 3, rank)
        out = os.path.join(run_dir, HF_DIRNAME)
        if rank == 0:
            module.save_pretrained(out, state_dict=sd)
            log.info("saved the Hugging Face model to %s (rope_theta %s)", out,
                     (module.hf.config.rope_parameters or {}).get("rope_theta"))
        return out


def resolve(cfg, tokenizer):
    """The one model object a recipe uses (``LlamaModel`` or ``HFModel``): heads, shape (parameter
    count, FLOPs), build and save. Fills in what comes from elsewhere (our Llama's vocabulary
    from the tokenizer) and checks it; reads an HF model's config.json, nothing bigger."""
    if is_hf(cfg):
        return HFModel(cfg, tokenizer)
    if cfg.vocab_size is None:
        cfg = dataclasses.replace(cfg, vocab_size=tokenizer.vocab_size)
    elif cfg.vocab_size < tokenizer.vocab_size:
        raise ValueError(f"model.vocab_size={cfg.vocab_size} < tokenizer vocabulary {tokenizer.vocab_size}")
    return LlamaModel(cfg)


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
