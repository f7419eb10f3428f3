"""Hugging Face causal LMs whose attention is ringattn's front door.

    sp = ringattn.SequenceParallel("ring", layout="zigzag")          # over the world
    model = HFCausalLM.from_pretrained("/local/llama", sp=sp, rope_theta=1e6)
    logits = model(sp.shard(tokens), sp.positions(seq_len))          # this rank's logits

How it plugs in, through transformers' public interface only: ``register()`` adds an
attention function named ``"ringattn"`` to ``transformers.AttentionInterface``, and the
model is loaded with ``attn_implementation="ringattn"``. Each forward passes the
``SequenceParallel`` and this step's ``AttentionPlan`` (``sp.prepare``, made once per
forward; it carries packed-document ``cu_seqlens``) as keyword arguments, which
transformers hands unchanged to every attention call: no layer communicates to validate. Nothing in the library is patched;
the model's own modules (embeddings, RoPE, norms, MLP, head) run as they are, on the local
tokens, with ``position_ids`` = each token's *global* position so RoPE is right.

transformers gives the attention function q (b, h, s_local, d) and k/v (b, h_kv, s_local, d)
after RoPE; they go to ``sp.attention`` as (b, s, h, d) with the kv heads as they are (GQA
is kept, nothing repeated). A layer's ``sliding_window`` w (Mistral, Qwen2/3 with
``use_sliding_window``) becomes ``window_size=(w - 1, 0)``: transformers' mask lets query i
see keys j with i - w < j <= i. Since no mask function is registered for ``"ringattn"``,
transformers builds no (b, 1, s, s) mask at all. Gemma 2's ``softcap`` and GPT-OSS's
attention sinks (``s_aux``) go to ``sp.attention(softcap=..., sinks=...)``. Llama 4's
chunked layers (``layer_types[i] == "chunked_attention"``, ``attention_chunk_size`` c) get a
``ringattn.RangeMask.chunked`` (causal inside chunks of c tokens of the full sequence; with
packed documents the chunks restart at every document), prepared with the step's plan and
chosen per layer from ``config.layer_types[module.layer_idx]``. The adapter is
strict: a keyword argument it neither understands nor knows to be harmless raises a
ValueError naming it and the model class, so a new architecture's extra attention input
can never be ignored silently.

Large models: ``from_pretrained`` (transformers >= 5) builds the model on the meta device
and loads each weight straight into place. Under DeepSpeed ZeRO-3 keep an
``transformers.integrations.HfDeepSpeedConfig(ds_config)`` alive while loading (the recipe's
``build_model`` does this): the model is then constructed inside ``deepspeed.zero.Init`` and
every rank keeps only its partition of each weight. ``empty_model()`` builds the model on the
meta device (``accelerate.init_empty_weights``) to count parameters or plan memory without
allocating any.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from ..plan import AttentionPlan
from . import mixers, tiling

ATTN_IMPLEMENTATION = "ringattn"
SP_KWARG = "ringattn_sp"
PLAN_KWARG = "ringattn_plan"
CU_SEQLENS_KWARG = "ringattn_cu_seqlens"  # without a plan: checked per call
MASKS_KWARG = "ringattn_masks"  # {layer type: RangeMask}, e.g. Llama 4's chunked layers


# Keyword arguments transformers' attention modules pass that carry nothing the attention
# computation needs (verified for every architecture in tests/test_hf_architectures.py):
KNOWN_HARMLESS = {
    "position_ids": "RoPE is applied to q/k before the attention call; documents come as "
                    f"{CU_SEQLENS_KWARG}, not as position resets",
    "use_cache": "the KV cache is refused separately (q and k lengths must agree)",
    "output_router_logits": "a MoE router flag travelling with the layer kwargs",
}
# Keyword arguments this function understands (and acts on).
UNDERSTOOD = {SP_KWARG, PLAN_KWARG, CU_SEQLENS_KWARG, MASKS_KWARG, "is_causal", "sliding_window", "softcap", "s_aux"}


def check_attention_kwargs(module: nn.Module, kwargs: dict) -> None:
    """Every keyword argument is understood or known to be harmless; anything else may change
    the attention (a sink, a cap, a bias, a mask variant), so it is refused, never ignored."""
    unknown = sorted(n for n in kwargs if n not in UNDERSTOOD and n not in KNOWN_HARMLESS)
    if unknown:
        model_type = getattr(getattr(module, "config", None), "model_type", "?")
        raise ValueError(
            f"{type(module).__name__} (model_type={model_type!r}) passes attention keyword "
            f"argument(s) {unknown} that ringattn does not understand; refusing rather than "
            "ignoring them (the result could be silently wrong)"
        )


def ringattn_attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor,
                               value: torch.Tensor, attention_mask: Optional[torch.Tensor],
                               scaling: Optional[float] = None, dropout: float = 0.0, **kwargs):
    """transformers' attention-function signature -> (out (b, s, h, d), None).

    Understood keywords: ``is_causal``, ``sliding_window``, ``softcap`` (Gemma 2 logit
    softcapping), ``s_aux`` (GPT-OSS attention sinks, (h,)); ``KNOWN_HARMLESS`` ones are
    accepted; any other raises a ValueError naming it and the model class.
    """
    check_attention_kwargs(module, kwargs)
    sp = kwargs.get(SP_KWARG)
    if sp is None:
        raise RuntimeError(
            f"attn_implementation={ATTN_IMPLEMENTATION!r} needs the SequenceParallel as keyword "
            f"{SP_KWARG}=sp in the model call; wrap the model in ringattn.models.hf.HFCausalLM"
        )
    if attention_mask is not None:
        raise ValueError("ringattn attention takes no attention_mask (padding is not supported; "
                         "pack documents with cu_seqlens instead)")
    if dropout:
        raise ValueError(f"attention dropout is not supported by ringattn (got {dropout}); "
                         "set the model config's attention_dropout to 0")
    if key.shape[2] != query.shape[2]:
        raise ValueError("ringattn attention runs without a KV cache (q and k lengths differ); "
                         "call the model with use_cache=False")
    causal = kwargs.get("is_causal")
    causal = getattr(module, "is_causal", True) if causal is None else causal
    window = kwargs.get("sliding_window")
    if window is None:
        window_size = (-1, -1)
    else:  # transformers' masks: causal i - w < j <= i; bidirectional |i - j| <= w
        window_size = (int(window) - 1, 0) if causal else (int(window), int(window))
    kw = dict(causal=causal, softmax_scale=scaling, window_size=window_size,
              plan=kwargs.get(PLAN_KWARG))
    mask = _layer_mask(module, kwargs.get(MASKS_KWARG))
    if mask is not None:  # the mask is the layer's whole rule (documents included)
        kw.update(mask=mask, causal=False)
    if kwargs.get("softcap") is not None:
        kw["softcap"] = float(kwargs["softcap"])
    if kwargs.get("s_aux") is not None:
        kw["sinks"] = kwargs["s_aux"]
    cu = kwargs.get(CU_SEQLENS_KWARG)
    if cu is not None and kw["plan"] is None and mask is None:
        kw["cu_seqlens"] = cu
    q, k, v = _autocast(query, key, value)
    out = sp.attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), **kw)
    return out, None


def _autocast(*tensors):
    """Under autocast (e.g. Trainer's bf16=True) transformers hands over fp32 q/k (RoPE is
    computed in fp32) and a v in the autocast dtype; cast all three to it, as autocast
    does for the SDPA call of transformers' own attention."""
    device = tensors[0].device.type
    if not torch.amp.is_autocast_available(device) or not torch.is_autocast_enabled(device):
        return tensors
    dtype = torch.get_autocast_dtype(device)
    return tuple(t.to(dtype) for t in tensors)


def _layer_mask(module: nn.Module, masks):
    """The ``RangeMask`` of this attention module's layer type, or None (causal/window)."""
    if not masks:
        return None
    layer_types = getattr(module.config, "layer_types", None)
    if layer_types is None:  # one kind of layer
        return masks.get("full_attention")
    layer_idx = getattr(module, "layer_idx", None)
    if layer_idx is None:
        raise ValueError(f"{type(module).__name__}: range masks per layer type need the "
                         "module's layer_idx")
    return masks.get(layer_types[layer_idx])


def attention_rules(config) -> list[tuple[bool, tuple[int, int]]]:
    """The (causal, window_size) rules a transformers model's layers use, as
    ``ringattn_attention`` derives them from its keywords: causal, and the sliding window
    (w -> (w - 1, 0)) if the config has one. For ``prepare(rules=...)``: each is planned
    before the first layer (a rule missing here still works, planned at its first call)."""
    window = getattr(config, "sliding_window", None)
    return [(True, (-1, -1))] + ([(True, (int(window) - 1, 0))] if window else [])


ATTENTION_LAYER_TYPES = ("full_attention", "sliding_attention", "chunked_attention")
FEEDFORWARD_LAYER_TYPES = ("mlp", "moe")  # Nemotron-H's layers without a token mixer


def check_supported(model: nn.Module, recurrent_mixers: bool = False) -> None:
    """Refuse, before computing anything, models whose sequence mixing is not what
    ``sp.attention`` computes from the keyword arguments: attention patterns that live only
    in transformers' mask functions (chunked, bidirectional), sparse attention whose indexer
    picks keys (DeepSeek-V3.2 DSA), and mixers outside attention
    (convolutions, Mamba, linear attention) other than the recurrent mixers of
    ``mixers.MIXER_FAMILIES``, which run under ``mixers.SequenceMixers`` when the caller
    installs them (``recurrent_mixers=True``: ``HFCausalLM`` and the Trainer / accelerate
    integrations' ``SequenceParallelism.prepare_model``). MLA (DeepSeek-V3,
    LongCat-Flash: v's head size unlike q/k's) is supported."""
    config, name = model.config, type(model).__name__
    # DeepSeek Sparse Attention's lightning indexer (transformers 5.25: deepseek_v32,
    # glm_moe_dsa, glm5_next, mistral_large4, deepseek_v4, dots3_note, step3p7) picks each
    # query's top-k keys over the whole sequence: token mixing sp.attention does not do
    indexer = [f for f in ("index_topk", "index_n_heads", "index_topk_blocks")
               if getattr(config, f, None) is not None]
    if indexer:
        raise ValueError(f"{name}: sparse attention with an indexer (DeepSeek-V3.2 DSA / GLM; "
                         f"config {indexer}) is not supported by ringattn sequence parallelism: "
                         "the indexer picks each query's top-k keys over the whole sequence")
    found = mixers.find_mixers(model)
    if found and not recurrent_mixers:
        kinds = sorted({type(m).__name__ for m in found.values()})
        raise ValueError(f"{name}: recurrent mixers ({', '.join(kinds)}) run under sequence "
                         "parallelism only where ringattn installs them (ringattn.models.hf.HFCausalLM, "
                         "or the Trainer / accelerate integrations' SequenceParallelism.prepare_model); "
                         "the attention function alone (use_ringattn) would run them on each shard: refused")
    handled = mixers.mixer_layers(model)
    layer_types = list(getattr(config, "layer_types", None) or ())
    other = sorted({t for i, t in enumerate(layer_types) if t not in ATTENTION_LAYER_TYPES
                    and t not in FEEDFORWARD_LAYER_TYPES and i not in handled})
    if other:
        raise ValueError(f"{name}: layer types {other} mix tokens with a module ringattn does not "
                         "know; sequence parallelism for a recurrent mixer needs its scheme "
                         f"(ringattn.models.mixers knows {sorted(mixers.MIXER_FAMILIES)}): "
                         "not supported")
    if getattr(config, "use_bidirectional_attention", None):
        raise ValueError(f"{name}: use_bidirectional_attention is not supported by ringattn")
    inside = tuple(n + "." for n in mixers.find_mixers(model))
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv1d) and not n.startswith(inside)]
    if convs:
        raise ValueError(f"{name}: sequence convolutions ({convs[0]}, ...) mix tokens outside "
                         "attention and outside any recurrent mixer ringattn knows; they would "
                         "see only this rank's shard: not supported")


def register() -> str:
    """Register the ``"ringattn"`` attention function with transformers (idempotent)."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, ringattn_attention_forward)
    return ATTN_IMPLEMENTATION


def use_ringattn(hf_model: nn.Module, recurrent_mixers: bool = False) -> nn.Module:
    """Check that the model's sequence mixing is supported, then set its attention to
    ``"ringattn"`` (in place; returns the model). Its forward then needs ``ringattn_sp=sp``.
    ``recurrent_mixers``: the caller runs the model's recurrent mixers (``HFCausalLM``)."""
    check_supported(hf_model, recurrent_mixers)
    register()
    if hf_model.config._attn_implementation != ATTN_IMPLEMENTATION:
        hf_model.set_attn_implementation(ATTN_IMPLEMENTATION)
    return hf_model


def load_config(path: str, rope_theta: Optional[float] = None,
                max_position_embeddings: Optional[int] = None):
    """The model's config from a local path, with a new RoPE base and context length if given."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path, local_files_only=True)
    return with_rope(config, rope_theta, max_position_embeddings)


def with_rope(config, rope_theta: Optional[float] = None, max_position_embeddings: Optional[int] = None):
    """Set RoPE θ (transformers >= 5 keeps it in ``config.rope_parameters``) and the context length."""
    if rope_theta is not None:
        params = dict(getattr(config, "rope_parameters", None) or {"rope_type": "default"})
        if "rope_theta" not in params and any(isinstance(v, dict) for v in params.values()):
            raise ValueError("per-layer-type RoPE parameters: set rope_theta per layer type yourself")
        params["rope_theta"] = float(rope_theta)
        config.rope_parameters = params
    if max_position_embeddings is not None:
        config.max_position_embeddings = int(max_position_embeddings)
    return config


def rope_theta(config) -> Optional[float]:
    return (getattr(config, "rope_parameters", None) or {}).get("rope_theta")


def empty_model(config):
    """The model on the meta device (no memory), e.g. to count parameters of a big model."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        return AutoModelForCausalLM.from_config(config)


@dataclass(frozen=True)
class ModelPlan:
    """A forward's plans, built ahead on the host (``HFCausalLM.build_plan``)."""

    attention: AttentionPlan
    mixers: Optional[mixers.MixerPlan] = None  # hybrids' recurrent mixers; None: none, or built late


class HFCausalLM(nn.Module):
    """A transformers causal LM over this rank's tokens, attention through ``sp``.

    ``forward(tokens, positions, cu_seqlens=None) -> logits`` is the interface of
    ``ringattn.models.Llama``: tokens (b, s_local), positions (s_local,) global RoPE positions
    (or positions within each document when packed), cu_seqlens the full packed sequence's
    document boundaries. Labels are the caller's business (shifted on the full sequence
    before sharding), so transformers' own loss -- which would shift the local shard -- is
    never used. ``hf`` is the unchanged transformers model (``save_pretrained`` etc.).
    """

    def __init__(self, hf_model: nn.Module, sp=None, *, tiled_loss: bool = True,
                 loss_tile_tokens: Optional[int] = None, offload_activations: bool = False):
        super().__init__()
        use_ringattn(hf_model, recurrent_mixers=True)
        self.hf = hf_model
        self.sp = sp if sp is not None else _local_sp()
        self.tiled_loss, self.loss_tile_tokens = tiled_loss, loss_tile_tokens
        self.offload_activations = offload_activations
        # fp32 RoPE inverse frequencies, recomputed from the config: a plain attribute, so that
        # casts of the module (DeepSpeed's bf16 .bfloat16(), .to(dtype)) cannot round them
        self._rope_fp32 = {name: _inv_freq_fp32(mod) for name, mod in hf_model.named_modules()
                           if _is_rotary(mod)}
        # recurrent mixers (hybrids): hooks that run each over the gathered sequence
        self._mixers = mixers.SequenceMixers(hf_model)

    @classmethod
    def from_pretrained(cls, path: str, sp=None, *, rope_theta: Optional[float] = None,
                        max_position_embeddings: Optional[int] = None, dtype=torch.float32,
                        tiled_loss: bool = True, loss_tile_tokens: Optional[int] = None,
                        offload_activations: bool = False, **kwargs):
        from transformers import AutoModelForCausalLM

        register()
        config = load_config(path, rope_theta, max_position_embeddings)
        model = AutoModelForCausalLM.from_pretrained(path, config=config, dtype=dtype, local_files_only=True,
                                                     attn_implementation=ATTN_IMPLEMENTATION, **kwargs)
        return cls(model, sp, tiled_loss=tiled_loss, loss_tile_tokens=loss_tile_tokens,
                   offload_activations=offload_activations)

    @property
    def config(self):
        return self.hf.config

    def _keep_rope_fp32(self) -> None:
        """transformers loads ``inv_freq`` in fp32 but a module cast (bf16 training) rounds it,
        which at position p shifts RoPE angles by ~p * 2^-9 rad: ruinous at long context."""
        for name, mod in self.hf.named_modules():
            inv = self._rope_fp32.get(name)
            if inv is not None and mod.inv_freq.dtype != torch.float32:
                for buf in ("inv_freq", "original_inv_freq"):
                    if getattr(mod, buf, None) is not None:
                        setattr(mod, buf, inv.to(mod.inv_freq.device))

    def enable_checkpointing(self) -> None:
        """transformers' per-layer activation checkpointing; reentrant when the saved layer inputs
        are offloaded (the reentrant checkpoint saves them through the saved-tensor hooks)."""
        self.hf.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": self.offload_activations})

    def tile_mlps(self, tile_tokens: Optional[int] = None) -> int:
        """Run every decoder layer's ``mlp`` over sequence tiles (``tiling.TiledMLP``); parameter
        names are unchanged. Returns the number of MLPs wrapped."""
        return tiling.tile_mlps(self.hf, self.hf.config.intermediate_size, tile_tokens)

    def _head_weight(self) -> torch.Tensor:
        head = self.hf.get_output_embeddings()
        config = self.hf.config
        if getattr(head, "bias", None) is not None or getattr(config, "final_logit_softcapping", None) \
                or getattr(config, "logit_scale", None) not in (None, 1.0):
            raise ValueError(f"{type(self.hf).__name__}: the tiled loss applies a plain bias-free head "
                             "(this model's head has a bias, a logit scale or softcapping); set "
                             "model.tiled_loss=false")
        return head.weight

    def build_plan(self, shape, cu_seqlens=None, mask=None, device=None) -> "ModelPlan":
        """The plans of a forward over local tokens of ``shape`` (attention; the recurrent
        mixers' permutations for hybrids), built on the host with no collective: build them
        with the batch and pass them to ``forward(plan=...)``."""
        masks = self._layer_masks(int(shape[1]) * self.sp.world_size, cu_seqlens, mask)
        if masks:  # the documents travel inside the masks (a plan takes one or the other)
            attention = self.sp.build_plan(shape, device=device, mask=list(masks.values()))
        else:
            attention = self.sp.build_plan(shape, cu_seqlens=cu_seqlens, device=device,
                                           rules=attention_rules(self.hf.config))
        mixer_plan = self._mixers.plan(self.sp, shape, cu_seqlens, device) if self._mixers else None
        return ModelPlan(attention, mixer_plan)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, cu_seqlens=None, labels=None,
                mask=None, plan=None):
        """Logits (b, s_local, vocab); with ``labels`` (b, s_local), -100 = ignored, a
        ``tiling.TokenLoss``: the base model gives the hidden states and the head is applied
        per sequence tile (full logits never exist) unless ``tiled_loss=False``. ``mask``: a
        ``ringattn.RangeMask`` of the full sequence for every layer (models whose layers are
        all full attention), instead of causal attention over ``cu_seqlens``. ``plan``:
        ``build_plan(...)`` of these arguments, made ahead; None: built here."""
        self._keep_rope_fp32()
        position_ids = positions.reshape(1, -1).expand(tokens.shape[0], -1)
        # Once per forward: every layer's attention (and recompute) reuses this plan.
        masks = self._layer_masks(tokens.shape[1] * self.sp.world_size, cu_seqlens, mask)
        if plan is None:
            plan = self.build_plan(tokens.shape, cu_seqlens, mask, tokens.device)
        if not isinstance(plan, ModelPlan):  # an attention plan alone (``sp.build_plan``)
            plan = ModelPlan(plan, None)
        if self._mixers:  # once per forward: the permutations every mixer reads
            self._mixers.use(plan.mixers or self._mixers.plan(self.sp, tokens.shape, cu_seqlens,
                                                              tokens.device))
        kw = {SP_KWARG: self.sp, PLAN_KWARG: plan.attention.agree(), MASKS_KWARG: masks}
        offload = self.offload_activations and self.training and self.hf.is_gradient_checkpointing
        with tiling.activation_offload(tokens.device) if offload else contextlib.nullcontext():
            if labels is None or not self.tiled_loss:
                logits = self.hf(input_ids=tokens, position_ids=position_ids, use_cache=False, **kw).logits
            else:
                out = self._decoder()(input_ids=tokens, position_ids=position_ids, use_cache=False, **kw)
        if labels is None:
            return logits
        if not self.tiled_loss:  # the reference path: the head as transformers applies it
            return tiling.logits_loss(logits, labels)
        # the head weight is read here, in this module's forward (ZeRO-3 gathers it for this call)
        return tiling.token_loss(out.last_hidden_state, self._head_weight(), labels, self.loss_tile_tokens)

    def _decoder(self) -> nn.Module:
        """The model without its head (hidden states out). transformers' ``base_model`` is
        the attribute ``base_model_prefix`` names, or the model itself where that attribute
        does not exist (Llama 4's text model: prefix "language_model", decoder at ``model``)."""
        base = self.hf.base_model
        if base is self.hf and isinstance(getattr(self.hf, "model", None), nn.Module):
            return self.hf.model
        return base

    def _layer_masks(self, seqlen: int, cu_seqlens, mask=None) -> dict:
        """{layer type: RangeMask} for layer types a (causal, window) rule cannot express:
        Llama 4's chunked layers (then the full layers carry the documents as a RangeMask
        too), or the caller's ``mask`` on every layer. Empty otherwise."""
        config = self.hf.config
        types = set(getattr(config, "layer_types", None) or ("full_attention",))
        if mask is not None:
            if types != {"full_attention"} or getattr(config, "sliding_window", None) and \
                    getattr(config, "use_sliding_window", True):
                raise ValueError(f"{type(self.hf).__name__}: a RangeMask applies to every layer; "
                                 f"this model's layers are {sorted(types)} (or windowed): refused")
            if cu_seqlens is not None:
                raise ValueError("pass documents either as cu_seqlens or inside the RangeMask, not both")
            return {"full_attention": mask}
        if "chunked_attention" not in types:
            return {}
        from ..rangemask import RangeMask

        if self.sp.layout == "doc_zigzag" and self.sp.world_size > 1:
            raise ValueError(f"{type(self.hf).__name__}: chunked attention under layout "
                             "'doc_zigzag' would need one placement for two masks; use zigzag")
        tuning = getattr(config, "attn_temperature_tuning", False)
        if tuning and self.sp.world_size > 1 and seqlen >= config.floor_scale:
            # transformers scales NoPE queries by their *local* index (arange of the shard),
            # which equals the global position only on one process
            raise ValueError(f"{type(self.hf).__name__}: attn_temperature_tuning with sequences "
                             f">= floor_scale ({config.floor_scale}) tokens uses local positions "
                             "under sequence parallelism; set attn_temperature_tuning=False")
        masks = {"chunked_attention": RangeMask.chunked(seqlen, config.attention_chunk_size,
                                                        cu_seqlens)}
        if cu_seqlens is not None:
            masks["full_attention"] = RangeMask.documents(cu_seqlens)
        return masks

    def save_pretrained(self, path: str, state_dict=None, **kwargs) -> None:
        """A Hugging Face model directory (config with the RoPE θ in use). transformers does not
        write the attention implementation into config.json, so it loads with its default."""
        self.hf.save_pretrained(path, state_dict=state_dict, **kwargs)


def _is_rotary(mod) -> bool:
    return isinstance(getattr(mod, "inv_freq", None), torch.Tensor) and hasattr(mod, "config") \
        and hasattr(mod, "rope_type")


def _inv_freq_fp32(mod) -> torch.Tensor:
    """The rotary module's inverse frequencies as transformers computes them at init, in fp32."""
    if mod.rope_type == "default" and hasattr(type(mod), "compute_default_rope_parameters"):
        inv, _ = type(mod).compute_default_rope_parameters(mod.config)
    else:
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        inv, _ = ROPE_INIT_FUNCTIONS[mod.rope_type](mod.config, torch.device("cpu"))
    return inv.float()


def _local_sp():
    import ringattn

    return ringattn.SequenceParallel.single()
