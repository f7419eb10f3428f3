"""Needle-in-a-haystack / passkey retrieval with ring attention at inference (no grad).

    python -m recipes.eval_needle checkpoint=outputs/RUN                    # a recipes.train run
    torchrun --standalone --nproc-per-node 2 -m recipes.eval_needle checkpoint=outputs/RUN \
        parallel.sp_size=2 'lengths=[256,512,1024]' 'depths=[0,0.25,0.5,0.75,1]'
    torchrun --standalone --nproc-per-node 8 -m recipes.eval_needle model=hf model.path=/models/x \
        task=text tokenizer=/models/x 'lengths=[32768,65536]' parallel.sp_size=8 dtype=bf16

For every (context length, needle depth) cell, ``samples`` sequences hide an n-digit passkey
at that depth of the context and ask for it at the end. By default the task's format (task,
digits) and the lengths (1x, 2x, 4x the trained length) come from the checkpoint's training
config, so the map measures retrieval, not a format mismatch. ``mode=teacher`` (default): a
sample is right when the argmax at every answer position is the answer token -- exactly when
greedy decoding would produce it -- so one forward per sequence suffices. ``mode=generate``:
greedy generation of the answer over a KV cache sharded across the SP group
(``ringattn.models.generate``; our Llama only), scored by exact match. ``task=passkey``: the
training task's format (recipes.data.PasskeyTask: random letters, ``#`` + digits, ``?`` +
digits), ``task=text``: an English haystack with "The pass key is N" (any tokenizer; the byte
tokenizer by default). Writes ``needle.json`` (the table) and ``needle.png`` (a heat map) to
the run directory, and logs both to W&B with ``logger=wandb``; for the passkey task on our
Llama also exact attention maps (``attention.json``, ``attention_needle.png``,
``attention_distance.png``; recipes/attention_maps.py, ``attention_samples=0`` turns them off).
``ppl_file=PATH``: also perplexity vs. context length on the start of a long local document.

The model: ``checkpoint=RUN_DIR`` (the model config from RUN_DIR/config.yaml; weights from
RUN_DIR/hf_model for HF runs, else the latest complete DeepSpeed checkpoint), or a model group
option (``model=hf model.path=...``; our Llama options need ``checkpoint``).
"""
from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import dataclass, field
from typing import Any, List, Optional

import hydra
import numpy as np
import torch
import torch.distributed as dist
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from omegaconf import MISSING, OmegaConf

import ringattn
from ringattn.models import LlamaConfig, generate
from recipes import attention_maps, checkpoint as ckpt_lib, data, distributed, models, tracking
from recipes.choices import Choice, Dtype, at_least
from recipes.data import IGNORE_INDEX, PasskeyTask
from recipes.distributed import ParallelConfig
from recipes.tracking import LoggerConfig

log = logging.getLogger("recipes.eval_needle")

HAYSTACK = ("The grass is green. The sky is blue. The sun is yellow. Here we go. "
            "There and back again. ")


class Task(Choice):
    passkey = "passkey"  # the training task's format (recipes.data.PasskeyTask)
    text = "text"  # an English haystack, any tokenizer


class Mode(Choice):
    teacher = "teacher"  # teacher-forced: the argmax at every answer position (one forward)
    generate = "generate"  # greedy generation over the sharded KV cache, exact match


@dataclass
class NeedleJob:
    model: Any = MISSING  # a conf/model option; replaced by the run's model with checkpoint=
    checkpoint: Optional[str] = None  # a recipes.train run directory (or one of its step_N dirs)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    # None: the checkpoint's task format (data.kind, data.passkey_digits, 1x/2x/4x data.seq_len),
    # else passkey, 2 digits, [256, 512]
    task: Optional[Task] = None
    tokenizer: Optional[str] = None  # local HF tokenizer; None: the run's, else bytes
    lengths: Optional[List[int]] = None
    depths: List[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    samples: int = 8  # per cell
    batch_size: int = 8  # sequences per forward
    passkey_digits: Optional[int] = None
    mode: Mode = Mode.teacher
    # attention maps (recipes/attention_maps.py): samples per cell, 0 = off; passkey task, our Llama
    attention_samples: int = 2
    seed: int = 1234
    dtype: Dtype = Dtype.fp32
    ppl_file: Optional[str] = None

    def __post_init__(self):
        at_least("samples", self.samples)
        at_least("batch_size", self.batch_size)
        at_least("passkey_digits", self.passkey_digits, allow_none=True)
        at_least("attention_samples", self.attention_samples, minimum=0)
        if (self.lengths is not None and not self.lengths) or not self.depths:
            raise ValueError("lengths and depths must be non-empty")
        if any(not 0.0 <= d <= 1.0 for d in self.depths):
            raise ValueError(f"depths must lie in [0, 1]; got {list(self.depths)}")


ConfigStore.instance().store(name="eval_needle_schema", node=NeedleJob)


# ---- samples ---------------------------------------------------------------------------------

def passkey_sample(length: int, depth: float, digits: int, rng: np.random.Generator):
    """PasskeyTask's format with the needle at ``depth`` of the context: (tokens, labels) of
    ``length``, labels on the answer digits only (shifted on the full sequence)."""
    return PasskeyTask.make(length, digits, PasskeyTask.needle_at(depth, length, digits), rng)


class TextNeedle:
    """An English haystack, "The pass key is N. Remember it. N is the pass key." at a depth,
    then "What is the pass key? The pass key is" and the answer, tokenized to exactly length+1."""

    def __init__(self, tokenizer, digits: int):
        self.tok, self.digits = tokenizer, digits
        self.hay = tokenizer.encode(HAYSTACK * 8)
        self.question = tokenizer.encode(" What is the pass key? The pass key is")

    def sample(self, length: int, depth: float, rng: np.random.Generator):
        key = "".join(str(d) for d in rng.integers(0, 10, size=self.digits))
        needle = self.tok.encode(f" The pass key is {key}. Remember it. {key} is the pass key. ")
        answer = self.tok.encode(f" {key}")
        room = length + 1 - len(needle) - len(self.question) - len(answer)
        if room < 0:
            raise ValueError(f"context length {length} is too short for the text needle: it needs at least "
                             f"{length - room} tokens with this tokenizer")
        before = int(round(depth * room))
        reps = room // len(self.hay) + 2
        hay = (self.hay * reps)
        seq = hay[:before] + needle + hay[before:room] + self.question + answer
        seq = torch.tensor(seq, dtype=torch.long)
        labels = torch.full((length,), IGNORE_INDEX, dtype=torch.long)
        labels[length - len(answer):] = seq[length + 1 - len(answer):]
        return seq[:-1], labels


# ---- model -----------------------------------------------------------------------------------

def _is_step_dir(path: str) -> bool:
    return os.path.basename(os.path.dirname(os.path.abspath(path))) == ckpt_lib.DIRNAME


def _run_dir_of(path: str) -> str:
    path = os.path.abspath(path)
    return os.path.dirname(os.path.dirname(path)) if _is_step_dir(path) else path


def model_config_of(job: NeedleJob):
    """The model config: from the checkpoint's run (config.yaml), else the model group option."""
    if job.checkpoint is None:
        if not models.is_hf(job.model):
            raise ValueError("our Llama needs trained weights: pass checkpoint=RUN_DIR (a recipes.train run)")
        return job.model, None
    run = _run_dir_of(job.checkpoint)
    cfg_file = os.path.join(run, "config.yaml")
    if not os.path.isfile(cfg_file):
        raise FileNotFoundError(f"checkpoint={job.checkpoint}: no config.yaml in {run} (a recipes.train run dir)")
    saved = OmegaConf.load(cfg_file)
    schema = models.HFModelConfig if "path" in saved.model else LlamaConfig
    model_cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), saved.model))
    return model_cfg, saved


def load_weights(job: NeedleJob, model) -> str:
    """Our Llama (or an HF run without hf_model/): the latest complete DeepSpeed checkpoint."""
    path = os.path.abspath(job.checkpoint)
    if not _is_step_dir(path):
        path = ckpt_lib.latest_complete(path)
        if path is None:
            raise FileNotFoundError(f"checkpoint={job.checkpoint}: no complete checkpoint in it "
                                    "(train with trainer.save_every=K: the default writes none)")
    meta = ckpt_lib.read_meta(path)
    if meta.get("zero_stage", 0) == 3:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        sd = get_fp32_state_dict_from_zero_checkpoint(os.path.dirname(path), tag=os.path.basename(path))
    else:
        sd = torch.load(os.path.join(path, "mp_rank_00_model_states.pt"), map_location="cpu",
                        weights_only=False)["module"]
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not k.endswith("rotary_emb.inv_freq")]
    if missing or unexpected:
        raise ckpt_lib.CheckpointError(f"{path}: weights do not match the model (missing {missing[:5]}, "
                                       f"unexpected {unexpected[:5]})")
    return path


def resolve_model(job: NeedleJob):
    """(the model object, the tokenizer, whether weights come from a DeepSpeed checkpoint)."""
    model_cfg, saved = model_config_of(job)
    from_checkpoint = saved is not None
    if from_checkpoint and models.is_hf(model_cfg):
        final = os.path.join(_run_dir_of(job.checkpoint), models.HF_DIRNAME)
        if os.path.isdir(final) and not _is_step_dir(job.checkpoint):
            from dataclasses import replace

            # the saved model already carries the new RoPE theta in its config
            model_cfg, from_checkpoint = replace(model_cfg, path=final, rope_theta=None), False
    tok_path = job.tokenizer or (saved.data.get("tokenizer") if saved is not None else None)
    tokenizer = data.build_tokenizer(data.DataConfig(tokenizer=tok_path))
    return models.resolve(model_cfg, tokenizer), tokenizer, from_checkpoint


def build_model(job: NeedleJob, model, ctx, from_checkpoint: bool):
    """(the module on ctx.device in eval mode, where its weights came from)."""
    module = model.build(ctx.sp, torch.device("cpu"), {})
    source = getattr(model.cfg, "path", None)
    if from_checkpoint:
        source = load_weights(job, module)
    module = module.to(ctx.device, job.dtype.torch).eval()
    return module, source


# ---- evaluation ------------------------------------------------------------------------------

def _sp_sum(t, ctx):
    if ctx.sp.world_size > 1:
        dist.all_reduce(t, group=ctx.sp.group)
    return t


def _dp_sum(values, ctx):
    t = torch.tensor(values, dtype=torch.float64, device=ctx.device)
    if ctx.dp_size > 1:
        dist.all_reduce(t, group=ctx.dp_group)
    return t.tolist()


@torch.no_grad()
def score(model, ctx, tokens, labels, positions):
    """(exactly right samples, right answer tokens, answer tokens) of a batch of full sequences."""
    x, y = ctx.sp.shard(tokens.to(ctx.device)), ctx.sp.shard(labels.to(ctx.device))
    pred = model(x, positions).argmax(-1)
    mask = y != IGNORE_INDEX
    per = torch.stack([((pred != y) & mask).sum(1), mask.sum(1)], 1).to(torch.float64)
    per = _sp_sum(per, ctx)  # (batch, [wrong, answer tokens]) over the whole sequence
    return int((per[:, 0] == 0).sum()), float((per[:, 1] - per[:, 0]).sum()), float(per[:, 1].sum())


@torch.no_grad()
def score_generate(model, ctx, tokens, labels):
    """As ``score``, by greedy generation: each sample's prompt is everything up to its first
    answer position; the model generates as many tokens as the answer has, over the KV cache
    sharded across the SP group (``ringattn.models.generate``); exact match per sample."""
    first = (labels != IGNORE_INDEX).to(torch.int8).argmax(1)  # index predicting the 1st answer token
    right, right_tok, n_tok = 0, 0.0, 0.0
    for a in first.unique().tolist():  # the same on every SP rank: they hold the same batch
        rows = (first == a).nonzero().flatten()
        answer = labels[rows, a:]
        out = generate(model, tokens[rows, :a + 1].to(ctx.device), answer.shape[1])[:, a + 1:]
        hit = out.cpu() == answer
        right, right_tok, n_tok = right + int(hit.all(1).sum()), right_tok + float(hit.sum()), n_tok + hit.numel()
    return right, right_tok, n_tok


@torch.no_grad()
def perplexity(model, ctx, ids: List[int], length: int, positions) -> Optional[float]:
    if len(ids) < length + 1:
        return None
    seq = torch.tensor(ids[:length + 1])[None]
    x, y = ctx.sp.shard(seq[:, :-1].to(ctx.device)), ctx.sp.shard(seq[:, 1:].to(ctx.device))
    logits = model(x, positions).float()
    nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum")
    nll = _sp_sum(nll.reshape(1).to(torch.float64), ctx)
    return float(torch.exp(nll / length))


def task_format(job: NeedleJob, saved) -> NeedleJob:
    """``job`` with task, passkey_digits and lengths filled in from the checkpoint's training
    config (``saved``) where not given: evaluating another format than the one trained on
    (e.g. 2-digit keys for a 1-digit model) measures the mismatch, not retrieval."""
    from dataclasses import replace

    trained = saved.data if saved is not None else None
    task = job.task or Task(trained.kind if trained is not None else Task.passkey)
    digits = job.passkey_digits
    if digits is None:
        digits = trained.passkey_digits if trained is not None and "passkey_digits" in trained else 2
    lengths = job.lengths
    if lengths is None:
        lengths = [f * trained.seq_len for f in (1, 2, 4)] if trained is not None else [256, 512]
    return replace(job, task=task, passkey_digits=digits, lengths=list(lengths))


def run(job: NeedleJob, out_dir: str, resolved: dict) -> dict:
    model_cfg, saved = model_config_of(job)
    job = task_format(job, saved)
    if job.mode == Mode.generate and models.is_hf(model_cfg):
        raise ValueError("mode=generate needs our Llama (sharded-KV-cache generation); Hugging Face "
                         "models are evaluated with mode=teacher")
    div = ringattn.layout_divisor(job.parallel.layout.value, job.parallel.sp_size)
    bad = [n for n in job.lengths if n % div]
    if bad:
        raise ValueError(f"lengths {bad} cannot be split by layout '{job.parallel.layout}' over sp_size="
                         f"{job.parallel.sp_size}: they must be multiples of {div}")
    distributed.validate(job.parallel, distributed.env_world_size())
    model, tokenizer, from_checkpoint = resolve_model(job)
    distributed.validate_heads(job.parallel, model.heads)
    ctx = distributed.init(job.parallel)
    out_dir = distributed.agree_on_run_dir(out_dir)
    module, source = build_model(job, model, ctx, from_checkpoint)
    text = TextNeedle(tokenizer, job.passkey_digits) if job.task == Task.text else None

    acc = np.zeros((len(job.depths), len(job.lengths)))
    tok_acc = np.zeros_like(acc)
    for j, length in enumerate(job.lengths):
        positions = ctx.sp.positions(length, device=ctx.device)
        for i, depth in enumerate(job.depths):
            # sample s of the cell is the same whatever the world; DP ranks take every dp-th
            mine = list(range(ctx.dp_rank, job.samples, ctx.dp_size))
            right = right_tok = n_tok = 0.0
            for b in range(0, len(mine), job.batch_size):
                batch = []
                for s in mine[b:b + job.batch_size]:
                    rng = np.random.Generator(np.random.PCG64([job.seed, length, int(depth * 1e6), s]))
                    batch.append(text.sample(length, depth, rng) if text else
                                 passkey_sample(length, depth, job.passkey_digits, rng))
                tokens, labels = (torch.stack(t) for t in zip(*batch))
                if job.mode == Mode.generate:
                    r, rt, nt = score_generate(module, ctx, tokens, labels)
                else:
                    r, rt, nt = score(module, ctx, tokens, labels, positions)
                right, right_tok, n_tok = right + r, right_tok + rt, n_tok + nt
            right, right_tok, n_tok = _dp_sum([right, right_tok, n_tok], ctx)
            acc[i, j], tok_acc[i, j] = right / job.samples, right_tok / max(n_tok, 1.0)
            if ctx.is_logger:
                log.info("length %6d depth %.2f: %.3f (answer tokens %.3f)", length, depth, acc[i, j], tok_acc[i, j])

    maps = None
    if job.attention_samples > 0 and job.task == Task.passkey and not models.is_hf(model_cfg):
        def cell(length, depth):  # the cell's first samples, as scored above
            rngs = (np.random.Generator(np.random.PCG64([job.seed, length, int(depth * 1e6), s]))
                    for s in range(job.attention_samples))
            return (torch.stack(t) for t in zip(*(passkey_sample(length, depth, job.passkey_digits, r)
                                                  for r in rngs)))
        maps = attention_maps.needle_attention(module, ctx, job.lengths, job.depths, job.passkey_digits,
                                               cell, job.seed)
    elif job.attention_samples > 0 and ctx.is_logger:
        log.info("attention maps skipped: they need task=passkey and our Llama")

    ppl = None
    if job.ppl_file:
        ids: List[int] = []
        with open(job.ppl_file, encoding="utf-8") as f:
            ids = tokenizer.encode(f.read())
        ppl = {}
        for length in job.lengths:
            ppl[str(length)] = perplexity(module, ctx, ids, length, ctx.sp.positions(length, device=ctx.device))

    table = {
        "task": job.task.value, "mode": job.mode.value, "model": source, "lengths": list(job.lengths),
        "depths": list(job.depths),
        "samples": job.samples, "passkey_digits": job.passkey_digits,
        "chance": 10.0 ** -job.passkey_digits, "accuracy": acc.tolist(), "answer_token_accuracy": tok_acc.tolist(),
        "mean_accuracy": float(acc.mean()), "parallel": resolved.get("parallel"), "perplexity": ppl,
    }
    if ctx.is_logger:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "needle.json"), "w") as f:
            json.dump(table, f, indent=1)
        png = heatmap(table, os.path.join(out_dir, "needle.png"))
        if maps is not None:
            with open(os.path.join(out_dir, "attention.json"), "w") as f:
                json.dump(maps, f)
            attention_maps.plot(maps, out_dir)
        _log_wandb(job.logger, out_dir, resolved, table, png)
        log.info("mean accuracy %.3f (chance %.3g); wrote %s and %s", table["mean_accuracy"], table["chance"],
                 os.path.join(out_dir, "needle.json"), png)
    return table


def heatmap(table: dict, path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    acc = np.array(table["accuracy"])
    fig, ax = plt.subplots(figsize=(max(4.5, 1.5 + 0.9 * acc.shape[1]), max(3.0, 1.2 + 0.6 * acc.shape[0])))
    im = ax.imshow(acc, vmin=0.0, vmax=1.0, cmap="RdYlGn", aspect="auto")
    ax.set_xticks(range(acc.shape[1]), [str(n) for n in table["lengths"]])
    ax.set_yticks(range(acc.shape[0]), [f"{d:.0%}" for d in table["depths"]])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth")
    for (i, j), v in np.ndenumerate(acc):
        ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=8)
    ax.set_title(f"passkey retrieval ({table['task']}, {table.get('mode', 'teacher')}, {table['samples']}/cell)")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _log_wandb(cfg: LoggerConfig, out_dir: str, resolved: dict, table: dict, png: str) -> None:
    if cfg.backend != tracking.Backend.wandb:
        return
    import wandb

    run = wandb.init(project=cfg.project, entity=cfg.entity, name=cfg.name, dir=out_dir, mode=cfg.wandb_mode(),
                     config=resolved, job_type="eval_needle", settings=wandb.Settings(console="off", quiet=True))
    rows = [[n, d, table["accuracy"][i][j]] for i, d in enumerate(table["depths"])
            for j, n in enumerate(table["lengths"])]
    run.log({"needle/table": wandb.Table(columns=["length", "depth", "accuracy"], data=rows),
             "needle/heatmap": wandb.Image(png), "needle/mean_accuracy": table["mean_accuracy"]})
    run.finish()


@hydra.main(config_path="../conf", config_name="eval_needle", version_base=None)
def main(cfg) -> None:
    tracking.configure_logging()
    resolved = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    job: NeedleJob = OmegaConf.to_object(cfg)
    out_dir = os.path.abspath(HydraConfig.get().runtime.output_dir)
    try:
        run(job, out_dir, resolved)
    finally:
        distributed.shutdown()


if __name__ == "__main__":
    sys.exit(main())
