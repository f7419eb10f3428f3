"""Scale simulator: one process plays any rank of any world, with no communication, and
reports the host side of attention at production sizes.

    python -m recipes.benchmarks.plan_scale seqlens=[1048576] world_sizes=[64] \
        strategies=[ring] layouts=[doc_zigzag,zigzag] masks=[documents,documents_window]

For every seqlen x world size x mask x strategy x layout it builds the plan of the
simulated ``ranks`` exactly as the attention path does (``ringattn.masking.rank_steps``;
nothing runs on tensors of tokens) and reports, per case:

- **calls**: kernel calls per rank per ring step, max and mean over the simulated ranks and
  the ring's steps (ring, hybrid); Ulysses: the calls of its one local pass over the whole
  sequence (every layout: the same, in position order); all-gather: the calls of its one
  pass (every source rank's tasks, keys moved to their gathered place);
- **plan**: wall time to build one rank's plan (median of ``repeats``) and its host memory
  (the tasks' Python objects, deep ``sys.getsizeof``) and device memory (the int32 varlen
  bounds and dense masks the plan copies to the device);
- **balance**: lock-step (sum over ring steps of the slowest rank's visible pairs / mean
  per-rank total, ``ringattn.balance.lockstep_imbalance``) and per-rank totals (max / mean).
  Each rank costs one plan, so above ``balance_ranks`` ranks an evenly spaced sample
  (rank 0 and the last included) stands for the ring: the max over a sample is a lower
  bound, and the table says how many ranks were planned. Ulysses splits heads, not the
  sequence: its balance is max / mean query heads per rank; hybrid multiplies the two;
- **bytes** each rank sends, with b = dtype bytes, d = head_dim, L = local tokens S / P:
    ring       per step 2 * L * kv_heads * d * b (its K and V shard; hybrid: L * u tokens
               and the K/V heads of its Ulysses rank), sent ring_length - 1 times;
    Ulysses    all-to-all of q, k, v in (L x (n_q(j) + 2 n_kv(j)) * d * b to every other
               rank j) and of the output back (L * n_q(r) * d * b to each), where n_q, n_kv
               are the query / K/V heads of ``ringattn.headsplit.split_heads``;
    all-gather 2 * L * kv_heads * d * b to each of the P - 1 other ranks;
- **projected forward time per layer**, from three stated coefficients (``launch_us`` per
  kernel call, ``peak_tflops``, ``link_gbps`` per rank) and FLOPs = 4 * pairs * heads * d
  (visible pairs, forward only):
    ring       sum over steps of max(FLOPs_s / peak, bytes / bandwidth) + calls_s * launch
               (K/V transfer overlaps compute; FLOPs_s of the step's slowest rank);
    Ulysses    all-to-all bytes / bandwidth + calls * launch + FLOPs / peak (no overlap);
    hybrid     Ulysses' all-to-all over u ranks + the ring over P / u positions;
    all-gather gather bytes / bandwidth + calls * launch + FLOPs / peak;
  and which summed term is largest: the host (launches), the GPU (FLOPs) or the network.
  The plan itself is built once per step, not per layer, so it is reported, not added.

Masks: ``documents`` (log-normal lengths of mean ``docs_mean``, ``ringattn.balance.
lognormal_documents``, causal), ``documents_window`` (the same under a causal window of
``window`` keys to the left), ``shared_prompt`` (``RangeMask.shared_prefix``: a causal
prompt of ``prompt_len`` tokens, then log-normal responses that see it), ``prefix_lm``
(``RangeMask.prefix_lm``: log-normal documents with a bidirectional prefix of
``prompt_len`` tokens, capped at each document) and ``causal`` (one document). doc_zigzag
places tokens by the documents, or by a range mask's segments (``mask.cu_seqlens``).
A case a world cannot run (heads < Ulysses size, a length the layout cannot split) is a row
saying why. Results: a markdown table on stdout and JSON to ``output``.
"""
from __future__ import annotations

import dataclasses
import json
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import hydra
import torch
from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from ringattn import RangeMask, balance
from ringattn.headsplit import split_heads
from ringattn.layouts import get_layout
from ringattn.masking import AttentionMask, rank_steps
from ringattn.plan import AttentionPlan
from recipes.choices import AttnDtype, Choice, Layout, Strategy, at_least


class MaskKind(Choice):
    """Which attention rule a case plans (see the module doc)."""

    causal = "causal"
    documents = "documents"
    documents_window = "documents_window"
    shared_prompt = "shared_prompt"
    prefix_lm = "prefix_lm"


@dataclass
class PlanScaleConfig:
    seqlens: list[int] = field(default_factory=lambda: [1 << 20])
    world_sizes: list[int] = field(default_factory=lambda: [64])
    strategies: list[Strategy] = field(default_factory=lambda: list(Strategy))
    layouts: list[Layout] = field(default_factory=lambda: list(Layout))
    masks: list[MaskKind] = field(default_factory=lambda: [
        MaskKind.documents, MaskKind.documents_window, MaskKind.shared_prompt, MaskKind.prefix_lm])
    ulysses_size: int = 8  # hybrid: Ulysses over this many consecutive ranks, ring over P / u
    ranks: list[int] = field(default_factory=lambda: [0])  # simulated ranks; negative: from the end
    balance_ranks: int = 64  # plan every rank for balance up to this P, else a sample this size
    repeats: int = 3  # plan time: median of this many builds
    # the masks' documents / responses: log-normal lengths (mean, log-space std, seed)
    docs_mean: float = 4096.0
    docs_sigma: float = 1.0
    seed: int = 0
    window: int = 4096  # documents_window: keys this far to the left (causal)
    prompt_len: int = 4096  # shared_prompt: the prompt; prefix_lm: each document's prefix (capped)
    # the attention shape (default: Llama-3-8B) and the cost model's coefficients
    heads: int = 32
    kv_heads: int = 8
    head_dim: int = 128
    dtype: AttnDtype = AttnDtype.bf16
    launch_us: float = 20.0  # host cost of one kernel call (launch + Python)
    peak_tflops: float = 400.0  # attention FLOP/s one GPU sustains
    link_gbps: float = 50.0  # GB/s one rank sends at
    output: str = "bench_results/plan_scale.json"

    def __post_init__(self):
        for name in ("ulysses_size", "balance_ranks", "repeats", "heads", "kv_heads", "head_dim"):
            at_least(name, getattr(self, name))
        for name in ("launch_us", "peak_tflops", "link_gbps", "docs_mean"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)}: must be > 0")
        at_least("window", self.window, 0)
        at_least("prompt_len", self.prompt_len)
        if self.heads % self.kv_heads:
            raise ValueError(f"heads={self.heads} must be a multiple of kv_heads={self.kv_heads}")
        if not self.ranks:
            raise ValueError("ranks: give at least one rank to simulate")


ConfigStore.instance().store(name="benchmark_plan_scale_schema", node=PlanScaleConfig)


# ---- masks -------------------------------------------------------------------------------
def _lengths(total: int, cfg: PlanScaleConfig, seed: int) -> torch.Tensor:
    cu = balance.lognormal_documents(total, mean=cfg.docs_mean, sigma=cfg.docs_sigma, seed=seed)
    return cu[1:] - cu[:-1]


def build_mask(kind: MaskKind, seqlen: int, cfg: PlanScaleConfig):
    """-> (mask, cu_seqlens the layouts place tokens by, documents or slices it holds)."""
    if kind in (MaskKind.causal, MaskKind.documents, MaskKind.documents_window):
        cu = (torch.tensor([0, seqlen], dtype=torch.int32) if kind == MaskKind.causal else
              balance.lognormal_documents(seqlen, mean=cfg.docs_mean, sigma=cfg.docs_sigma, seed=cfg.seed))
        window = (cfg.window, 0) if kind == MaskKind.documents_window else (-1, -1)
        return AttentionMask.build(seqlen, True, cu, window), cu, len(cu) - 1
    if kind == MaskKind.shared_prompt:
        if cfg.prompt_len >= seqlen:
            raise ValueError(f"prompt_len={cfg.prompt_len} leaves no room for responses in {seqlen}")
        mask = RangeMask.shared_prefix(cfg.prompt_len, _lengths(seqlen - cfg.prompt_len, cfg, cfg.seed))
    else:
        lengths = _lengths(seqlen, cfg, cfg.seed)
        cu = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(lengths.long(), 0)])
        mask = RangeMask.prefix_lm(cu, lengths.clamp_max(cfg.prompt_len))
    return mask, mask.cu_seqlens, len(mask.slices)


# ---- plan size ---------------------------------------------------------------------------
def _deep_size(obj, seen: set) -> int:
    if id(obj) in seen or obj is None or isinstance(obj, bool):
        return 0
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        return sys.getsizeof(obj) + obj.numel() * obj.element_size()
    size = sys.getsizeof(obj)
    if isinstance(obj, (list, tuple)):
        size += sum(_deep_size(x, seen) for x in obj)
    elif isinstance(obj, slice):
        size += sum(_deep_size(x, seen) for x in (obj.start, obj.stop, obj.step))
    elif dataclasses.is_dataclass(obj):
        size += sys.getsizeof(obj.__dict__) + sum(_deep_size(v, seen) for v in obj.__dict__.values())
    return size


def plan_bytes(steps) -> tuple[int, int]:
    """(host, device) bytes of a plan's tasks: host = every Python object of the task lists
    (small ints are shared by the interpreter and counted once); device = what the plan
    copies there: the varlen bounds as int32 and any dense mask."""
    device = 0
    for tasks in steps:
        for t in tasks:
            if t.segments is not None:
                device += 4 * sum(len(b) for b in t.segments)
            if t.mask is not None:
                device += t.mask.numel() * t.mask.element_size()
    return _deep_size(steps, set()), device


# ---- one case ----------------------------------------------------------------------------
def mla_ring_bytes(tokens: int, heads: int, qk_head_dim: int, v_head_dim: int, latent_dim: int,
                   rope_head_dim: int, elem_bytes: int = 2) -> dict:
    """Bytes one rank sends per ring step for a shard of ``tokens`` tokens of MLA attention
    (DeepSeek-V3: 128 heads, q/k 192, v 128, latent ``kv_lora_rank`` 512, rope 64), two ways:

    - ``per_head`` (what the ring sends): every head's up-projected K and V,
      tokens * heads * (qk_head_dim + v_head_dim) * b forward; backward adds their fp32
      gradients travelling with them: tokens * heads * (qk + v) * (b + 4);
    - ``latent``: the compressed latent and the one shared RoPE key,
      tokens * (latent_dim + rope_head_dim) * b forward (backward: + fp32 gradients, b + 4),
      up-projected on the receiving rank (``kv_b_proj``) at every step;
    - ``upproject_flops_per_token``: that recomputation, 2 * latent_dim * heads *
      (qk_head_dim - rope_head_dim + v_head_dim) FLOPs per received token per step.

    -> dict with those values and ``ratio`` = per_head / latent."""
    per_token = heads * (qk_head_dim + v_head_dim)
    latent_token = latent_dim + rope_head_dim
    return dict(per_head=tokens * per_token * elem_bytes,
                per_head_backward=tokens * per_token * (elem_bytes + 4),
                latent=tokens * latent_token * elem_bytes,
                latent_backward=tokens * latent_token * (elem_bytes + 4),
                upproject_flops_per_token=2 * latent_dim * heads
                * (qk_head_dim - rope_head_dim + v_head_dim),
                ratio=per_token / latent_token)


def _timed(build, repeats: int):
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = build()
        times.append(time.perf_counter() - t0)
    return out, statistics.median(times)


def _balance_sample(n: int, cap: int, must) -> list[int]:
    if n <= cap:
        return list(range(n))
    sample = torch.linspace(0, n - 1, cap).round().long().tolist()
    return sorted(set(sample) | set(must))


def _allgather_tasks(mask, layout: str, p: int, rank: int, seqlen: int):
    """All-gather's one pass for ``rank``, as the attention path plans it
    (``AttentionPlan.host_tasks``: keys in the gathered K/V's order), with no process group."""
    ranged = isinstance(mask, RangeMask)
    cu = None if ranged or mask.cu_seqlens is None else mask.cu_seqlens.to(torch.int32)
    plan = AttentionPlan("allgather", layout, 1, seqlen // p, ring_size=p, ring_rank=rank,
                         cu_seqlens=cu, masks=(mask,) if ranged else ())
    return plan.host_tasks(mask if ranged else (mask.causal, mask.window))[0]


def _pairs(tasks, n: int, m: int) -> int:
    return sum(t.scores(n, m) for t in tasks)


def _bound(host: float, gpu: float, net: float) -> str:
    return max((("host", host), ("GPU", gpu), ("network", net)), key=lambda kv: kv[1])[0]


def run_case(cfg: PlanScaleConfig, strategy: str, layout: str, mask, seqlen: int, p: int) -> dict:
    """The numbers of one case (module doc), or {"skipped": reason}."""
    elem = cfg.dtype.torch.itemsize
    d, h = cfg.head_dim, cfg.heads
    flops_per_pair = 4 * h * d  # all heads; Ulysses ranks scale by their share of heads
    launch, peak, bw = cfg.launch_us * 1e-6, cfg.peak_tflops * 1e12, cfg.link_gbps * 1e9
    u = {"ulysses": p, "hybrid": cfg.ulysses_size}.get(strategy, 1)
    if p % u:
        return {"skipped": f"P={p} is not a multiple of ulysses_size={u}"}
    try:
        split = split_heads(h, cfg.kv_heads, u)
    except ValueError as e:
        return {"skipped": str(e).split(":")[0]}
    ring = p // u  # ring positions (1 for Ulysses)
    lay = get_layout(layout)
    placed_on = ring if strategy != "ulysses" else p
    if seqlen % lay.divisor(placed_on):
        return {"skipped": f"{layout} over {placed_on} ranks needs seqlen % {lay.divisor(placed_on)} == 0"}
    local = seqlen // p  # tokens each rank holds
    n_q = [hi - lo for lo, hi in split.q]
    n_kv = [hi - lo for lo, hi in split.kv]
    head_balance = max(n_q) / (sum(n_q) / u)
    sim = sorted({r % p for r in cfg.ranks})
    row = {"ranks_simulated": sim}

    if strategy == "ulysses":  # one local pass over the whole sequence, in position order
        tasks, plan_s = _timed(lambda: rank_steps(get_layout("contiguous"), mask, 1, 0)[0], cfg.repeats)
        host, dev = plan_bytes([tasks])
        pairs = _pairs(tasks, seqlen, seqlen)
        r = max(range(u), key=lambda j: n_q[j])  # the rank with the most heads sets the pace
        sent = local * d * elem * (sum(n_q[j] + 2 * n_kv[j] for j in range(u) if j != r) + (u - 1) * n_q[r])
        host_t, gpu_t, net_t = len(tasks) * launch, pairs * 4 * n_q[r] * d / peak, sent / bw
        row.update(calls_max=len(tasks), calls_mean=float(len(tasks)), ring_length=1,
                   lockstep=head_balance, totals=head_balance, balance_ranks=p,
                   bytes_per_step=sent, bytes_per_forward=sent)
    else:
        ring_ranks = sorted({r // u for r in sim})  # hybrid: rank r is ring position r // u
        bal = _balance_sample(ring, cfg.balance_ranks, ring_ranks)
        work = balance.step_work(mask, layout, ring, ranks=bal)  # (ranks, steps) visible pairs
        steps_of = {}
        for i, rr in enumerate(ring_ranks):
            build = lambda rr=rr: rank_steps(lay, mask, ring, rr)  # noqa: E731
            steps_of[rr], t = _timed(build, cfg.repeats if i == 0 else 1)
            if i == 0:
                plan_s = t
        first = steps_of[ring_ranks[0]]
        ring_len = max([s + 1 for s in range(ring) if bool((work[:, s] > 0).any())]
                       + [s + 1 for st in steps_of.values() for s in range(ring) if st[s]] + [1])
        # K/V heads that travel: a split whose GQA groups are unequal expands K/V per query head
        kv_travel = max(n_kv[j] if split.kv_index(j) is None else n_q[j] for j in range(u))
        a2a = 0 if u == 1 else local * d * elem * max(
            sum(n_q[j] + 2 * n_kv[j] for j in range(u) if j != r) + (u - 1) * n_q[r] for r in range(u))
        if strategy == "allgather":
            tasks, plan_s = _timed(lambda: _allgather_tasks(mask, layout, ring, ring_ranks[0], seqlen),
                                   cfg.repeats)
            host, dev = plan_bytes([tasks])
            calls = [len(_allgather_tasks(mask, layout, ring, rr, seqlen)) for rr in ring_ranks]
            sent = 2 * local * cfg.kv_heads * d * elem * (p - 1)
            totals = balance.imbalance(work.sum(1))
            slowest = int(work.sum(1).max())
            host_t, gpu_t, net_t = max(calls) * launch, slowest * flops_per_pair / peak, sent / bw
            row.update(calls_max=max(calls), calls_mean=sum(calls) / len(calls), ring_length=1,
                       lockstep=totals, totals=totals, bytes_per_step=sent, bytes_per_forward=sent)
        else:  # ring, hybrid: ring steps; hybrid's ring ranks hold L * u tokens, heads / u
            host, dev = plan_bytes(first)
            calls = torch.tensor([[len(st[s]) for s in range(ring_len)] for st in steps_of.values()])
            step_bytes = 2 * local * u * kv_travel * d * elem
            per_pair = 4 * max(n_q) * d
            gpu_s = work[:, :ring_len].max(0).values.double() * per_pair / peak
            net_s = torch.tensor([step_bytes / bw if s + 1 < ring_len else 0.0 for s in range(ring_len)])
            host_s = calls.max(0).values.double() * launch
            host_t, gpu_t, net_t = (float(host_s.sum()), float(gpu_s.sum()), float(net_s.sum()))
            overlapped = float(torch.maximum(gpu_s, net_s).sum())
            row.update(calls_max=int(calls.max()), calls_mean=float(calls.double().mean()),
                       ring_length=ring_len,
                       lockstep=balance.lockstep_imbalance(work) * head_balance,
                       totals=balance.imbalance(work.sum(1)) * head_balance,
                       bytes_per_step=step_bytes, bytes_per_forward=step_bytes * (ring_len - 1) + a2a)
            net_t += a2a / bw
            row["projected_ms"] = (host_t + overlapped + a2a / bw) * 1e3
        row["balance_ranks"] = len(bal)
    row.setdefault("projected_ms", (host_t + gpu_t + net_t) * 1e3)
    row.update(plan_ms=plan_s * 1e3, plan_host_bytes=host, plan_device_bytes=dev,
               host_ms=host_t * 1e3, gpu_ms=gpu_t * 1e3, network_ms=net_t * 1e3,
               bound=_bound(host_t, gpu_t, net_t))
    return row


# ---- the report --------------------------------------------------------------------------
_COLUMNS = ("tokens", "P", "strategy", "layout", "mask", "docs/slices", "calls/step max", "mean",
            "ring steps", "plan ms", "plan KiB host / device", "lock-step", "totals", "ranks for balance",
            "MiB sent/step", "fwd ms/layer", "host / GPU / net ms", "bound")


def _tokens(n: int) -> str:
    for unit, size in (("M", 1 << 20), ("K", 1 << 10)):
        if n % size == 0:
            return f"{n // size}{unit}"
    return str(n)


def table_row(r: dict) -> str:
    """One markdown row of ``_COLUMNS`` for a case of ``run``."""
    cells = [_tokens(r["seqlen"]), r["world_size"], r["strategy"], r["layout"], r["mask"], r["docs"]]
    if "skipped" in r:
        cells += [f"skipped: {r['skipped']}"] + [""] * (len(_COLUMNS) - len(cells) - 1)
    else:
        bal = r["balance_ranks"]
        cells += [
            r["calls_max"], f"{r['calls_mean']:.2f}", r["ring_length"], f"{r['plan_ms']:.1f}",
            f"{r['plan_host_bytes'] / 1024:.0f} / {r['plan_device_bytes'] / 1024:.0f}",
            f"{r['lockstep']:.3f}", f"{r['totals']:.3f}",
            f"all {bal}" if bal == r["world_size"] // r["ring_divisor"] else f"{bal} sampled",
            f"{r['bytes_per_step'] / 2**20:.1f}", f"{r['projected_ms']:.2f}",
            f"{r['host_ms']:.2f} / {r['gpu_ms']:.2f} / {r['network_ms']:.2f}", r["bound"]]
    return "| " + " | ".join(str(c) for c in cells) + " |"


def run(cfg: PlanScaleConfig) -> list[dict]:
    torch.set_num_threads(1)  # the plan is host work on one core: measure it that way
    rows = []
    print("| " + " | ".join(_COLUMNS) + " |")
    print("|" + "---|" * 5 + "--:|" * 12 + "---|", flush=True)
    for seqlen in cfg.seqlens:
        for kind in cfg.masks:
            mask, placement, docs = build_mask(MaskKind(kind), seqlen, cfg)
            for p in cfg.world_sizes:
                for strategy in cfg.strategies:
                    for layout in cfg.layouts:
                        strategy, layout = str(strategy), str(layout)
                        row = {"seqlen": seqlen, "world_size": p, "strategy": strategy,
                               "layout": layout, "mask": str(kind), "docs": docs,
                               "ring_divisor": {"hybrid": cfg.ulysses_size}.get(strategy, 1)}
                        row.update(run_case(cfg, strategy, layout, mask, seqlen, p))
                        rows.append(row)
                        print(table_row(row), flush=True)
    result = {"machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
              "torch": torch.__version__, "rows": rows,
              "config": OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True, enum_to_str=True)}
    Path(cfg.output).parent.mkdir(parents=True, exist_ok=True)
    Path(cfg.output).write_text(json.dumps(result, indent=1))
    return rows


@hydra.main(config_path="../../conf", config_name="benchmarks/plan_scale", version_base="1.3")
def main(cfg) -> None:
    run(OmegaConf.to_object(cfg))


if __name__ == "__main__":
    main()
