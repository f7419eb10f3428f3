"""Attention benchmark: ring, Ulysses, hybrid and all-gather attention per layout vs. one process.

    # one process (P = 1), then two ranks:
    python -m recipes.benchmarks.attention
    torchrun --standalone --nproc-per-node 2 -m recipes.benchmarks.attention seqlens=[8192]

Per strategy (ring / ulysses / hybrid ring_size x ulysses_size / allgather: K/V gathered
once, Llama 3 style; one the head counts or
world size cannot split is skipped with the reason; uneven head counts such as heads=28
kv_heads=4 run Ulysses' uneven split) and layout it reports forward and
forward+backward time (max over ranks), achieved FLOP/s (``recipes.flops``: forward 4*b*s^2*h*d,
causal half; backward 2x forward), per-rank work balance (max/mean of attention scores
computed), the share of each pass spent waiting for communication, bytes sent per rank
(ring passes and all-to-alls), peak memory per rank, which kernel ran each kind of block
(``kernels``: forward calls per backend/block kind, e.g. flash_attn/varlen for packed
documents, sdpa/mask for irregular tiles), and the single-process time of the
same shape, giving efficiency = (single-process time / P) / parallel time.

Packed documents: ``doc_lengths=[...]``, or ``docs_lognormal_mean=4096`` (seeded log-normal
lengths, ``docs_sigma``, cut at each seqlen; ``ringattn.balance.lognormal_documents``). The
single-process baseline is then the library's own per-document path (one causal triangle
per document, no dense mask), so ``single / P`` is the balanced ideal: every rank doing
exactly 1/P of the needed work with no waiting. Rows also report the planned work balance
and the share of planned work on masked tiles (``ringattn.balance.scheduled_work``), and for
the ring the lock-step balance (``ringattn.balance.lockstep_imbalance``: the sum over ring
steps of the slowest rank's work over the mean rank's total, the pace the ring really runs
at; per-rank totals understate it).

    torchrun --standalone --nproc-per-node 2 -m recipes.benchmarks.attention seqlens=[16384] \
        docs_lognormal_mean=512 strategies=[ring] layouts=[contiguous,zigzag,striped,doc_zigzag]

Range masks (``ringattn.RangeMask``, built on the full sequence): ``range_mask=shared_prefix``
(a causal prompt of ``prompt_len`` tokens, then responses that see it and themselves) or
``range_mask=prefix_lm`` (packed documents, each with a bidirectional prefix of
``prompt_len`` tokens, capped at the document). ``response_lens`` gives the responses
(shared_prefix) or documents (prefix_lm); empty: a seeded log-normal draw of mean
``mask_mean_len`` (``docs_sigma``, ``docs_seed``). The mask replaces causal, window and
documents (refused with it); doc_zigzag places tokens by its segments (``mask.cu_seqlens``),
the plan is prepared with ``mask=``, the single-process baseline runs the same mask (so
``single / P`` is again the balanced ideal), and rows add the computed balance
``ringattn.balance.mask_work`` (``mask_balance``).

    torchrun --standalone --nproc-per-node 2 -m recipes.benchmarks.attention seqlens=[16384] \
        range_mask=shared_prefix prompt_len=4096 strategies=[ring] layouts=[contiguous,zigzag,doc_zigzag]
On CPU each rank (and the single-process baseline) uses ``threads_per_rank`` threads, so
P ranks stand for P devices. Results go to a table on stdout and to ``output`` (JSON).
"""
from __future__ import annotations

import datetime
import itertools
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import hydra
import torch
import torch.distributed as dist
from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

import ringattn
from ringattn import balance, profile
from ringattn.inputs import check_ulysses_heads
from ringattn.kernels import get_backend
from ringattn.masking import AttentionMask
from ringattn.ulysses import local_attention
from recipes import distributed
from recipes.flops import attention_flops
from recipes.choices import AttnDtype, Choice, Layout, Strategy
from recipes.memory import PeakMemory


class RangeMaskKind(Choice):
    """Which ``ringattn.RangeMask`` batch the benchmark builds (see the module doc)."""

    shared_prefix = "shared_prefix"
    prefix_lm = "prefix_lm"


@dataclass
class BenchmarkConfig:
    seqlens: list[int] = field(default_factory=lambda: [8192])
    batch: int = 1
    heads: int = 8
    kv_heads: int = 8
    head_dim: int = 64
    dtype: AttnDtype = AttnDtype.fp32
    causal: Optional[bool] = None  # None: True, or False under range_mask (the mask is the rule)
    layouts: list[Layout] = field(default_factory=lambda: [Layout.zigzag, Layout.striped, Layout.contiguous])
    # ring: K/V around all P ranks; ulysses: all-to-all over all P (needs heads >= P);
    # hybrid: Ulysses over ulysses_size consecutive ranks x ring over P / ulysses_size.
    strategies: list[Strategy] = field(default_factory=lambda: list(Strategy))
    ulysses_size: int = 2
    backend: str = "auto"
    # packed documents (lengths summing to each seqlen; empty = one document) and window
    doc_lengths: list[int] = field(default_factory=list)
    docs_lognormal_mean: Optional[int] = None  # packed log-normal documents of this mean length
    docs_sigma: float = 1.0  # log-space standard deviation of the log-normal lengths
    docs_seed: int = 0
    window: list[int] = field(default_factory=lambda: [-1, -1])
    # a range-mask batch instead of causal/window/documents (module doc)
    range_mask: Optional[RangeMaskKind] = None
    prompt_len: int = 1024  # shared_prefix: the prompt; prefix_lm: each document's prefix
    response_lens: list[int] = field(default_factory=list)  # responses / documents; empty: drawn
    mask_mean_len: int = 1024  # mean length of the drawn responses / documents
    softcap: Optional[float] = None  # logit softcapping (kernel: one that supports it)
    sinks: bool = False  # per-head attention sinks (GPT-OSS); not in the 1-process baseline
    warmup: int = 1
    iters: int = 3
    threads_per_rank: int = 1
    baseline: bool = True
    output: str = "bench_results/attention_p${oc.env:WORLD_SIZE,1}.json"
    collective_timeout_s: float = 600.0  # how long a collective may wait for a peer

    def __post_init__(self):
        # checked here, before any process starts: torch's own one-process baseline dies of a
        # floating-point exception (no Python error) when heads is not a multiple of kv_heads
        if self.heads % self.kv_heads:
            raise ValueError(f"heads={self.heads} must be a multiple of kv_heads={self.kv_heads}")
        if self.range_mask is not None:
            clash = [name for name, on in (("causal=true", self.causal), ("window", list(self.window) != [-1, -1]),
                                           ("doc_lengths", bool(self.doc_lengths)),
                                           ("docs_lognormal_mean", self.docs_lognormal_mean is not None),
                                           ("sinks", self.sinks)) if on]
            if clash:
                raise ValueError(f"range_mask={self.range_mask} is the whole attention rule; drop "
                                 f"{', '.join(clash)}")
            if self.prompt_len < 1:
                raise ValueError(f"prompt_len must be >= 1; got {self.prompt_len}")
        self.causal = self.range_mask is None if self.causal is None else self.causal


ConfigStore.instance().store(name="benchmark_attention_schema", node=BenchmarkConfig)


def _setup(cfg):
    """The process group (a world of one without a launcher), as the other recipes start it."""
    return distributed.init_world(datetime.timedelta(seconds=cfg.collective_timeout_s))


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _max_over_ranks(x: float) -> float:
    return _reduce(x, dist.ReduceOp.MAX)


def _reduce(x: float, op) -> float:
    t = torch.tensor([x], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=op)
    return t.item()


def _time(fn, cfg, device, across_ranks=True):
    """Mean seconds per call (of the slowest rank when ``across_ranks``)."""
    for _ in range(cfg.warmup):
        fn()
    _sync(device)
    if across_ranks:
        dist.barrier()
    start = time.perf_counter()
    for _ in range(cfg.iters):
        fn()
    _sync(device)
    elapsed = (time.perf_counter() - start) / cfg.iters
    return _max_over_ranks(elapsed) if across_ranks else elapsed


def _inputs(cfg, seqlen, device, dtype):
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(cfg.batch, seqlen, cfg.heads, cfg.head_dim, generator=gen)
    k = torch.randn(cfg.batch, seqlen, cfg.kv_heads, cfg.head_dim, generator=gen)
    v = torch.randn(cfg.batch, seqlen, cfg.kv_heads, cfg.head_dim, generator=gen)
    return [t.to(device, dtype) for t in (q, k, v)]


def _fwd_bwd(attend, q, k, v):
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))

    def fwd():
        with torch.no_grad():
            attend(q, k, v)

    def fwd_bwd():
        out = attend(q, k, v)
        out.backward(torch.ones_like(out))

    return fwd, fwd_bwd


def _range_mask(cfg, seqlen) -> Optional[ringattn.RangeMask]:
    """The configured range mask over the whole ``seqlen`` sequence, or None."""
    if cfg.range_mask is None:
        return None
    rest = seqlen - cfg.prompt_len if cfg.range_mask == "shared_prefix" else seqlen
    if rest < 1:
        raise ValueError(f"prompt_len={cfg.prompt_len} leaves no room for a response in seqlen {seqlen}")
    if cfg.response_lens:
        if sum(cfg.response_lens) != rest:
            raise ValueError(f"response_lens sum to {sum(cfg.response_lens)}, not {rest} "
                             f"(seqlen{' - prompt_len' if rest != seqlen else ''})")
        lens = list(cfg.response_lens)
    else:
        lens = balance.lognormal_documents(rest, mean=cfg.mask_mean_len, sigma=cfg.docs_sigma,
                                           seed=cfg.docs_seed).diff().tolist()
    if cfg.range_mask == "shared_prefix":
        return ringattn.RangeMask.shared_prefix(cfg.prompt_len, lens)
    cu = torch.tensor([0, *lens]).cumsum(0)
    return ringattn.RangeMask.prefix_lm(cu, [min(cfg.prompt_len, n) for n in lens])


def _cu_seqlens(cfg, seqlen, device):
    """Document boundaries: packed documents', or a range mask's segments (for placement)."""
    mask = _range_mask(cfg, seqlen)
    if mask is not None:
        return mask.cu_seqlens.to(device)
    if cfg.docs_lognormal_mean is not None:
        if cfg.doc_lengths:
            raise ValueError("give doc_lengths or docs_lognormal_mean, not both")
        return balance.lognormal_documents(seqlen, mean=cfg.docs_lognormal_mean, sigma=cfg.docs_sigma,
                                           seed=cfg.docs_seed).to(device)
    if not cfg.doc_lengths:
        return None
    if sum(cfg.doc_lengths) != seqlen:
        raise ValueError(f"doc_lengths sum to {sum(cfg.doc_lengths)}, not seqlen {seqlen}")
    cu = torch.tensor([0, *cfg.doc_lengths], dtype=torch.int64).cumsum(0)
    return cu.to(device, torch.int32)


_MESHES: dict = {}  # Ulysses size -> the mesh over the whole world (built once, by every rank in turn)


def _front_door(cfg, strategy, layout, device):
    """The SequenceParallel for ``strategy``, or None (with the reason) if it cannot run."""
    world = dist.get_world_size()
    u = {"ring": 1, "allgather": 1, "ulysses": world, "hybrid": cfg.ulysses_size}[strategy]
    if world % u:
        return None, f"ulysses_size {u} does not divide {world} ranks"
    if u > 1:
        try:
            check_ulysses_heads(cfg.heads, cfg.kv_heads, u)
        except ValueError as e:
            return None, str(e)
    if u not in _MESHES:
        _MESHES[u] = ringattn.init_mesh(sp=world, ulysses=u, device_type=device.type,
                                        timeout=datetime.timedelta(seconds=cfg.collective_timeout_s))
    return ringattn.SequenceParallel(strategy, layout, mesh=_MESHES[u], backend=cfg.backend), None


def bench_ring(cfg, seqlen, layout, device, dtype, strategy="ring"):
    world = dist.get_world_size()
    sp, why_not = _front_door(cfg, strategy, layout, device)
    if sp is None:
        return {"strategy": strategy, "layout": layout, "world": world, "seqlen": seqlen,
                "skipped": why_not}
    cu, mask = _cu_seqlens(cfg, seqlen, device), _range_mask(cfg, seqlen)
    q, k, v = (sp.shard(t, cu_seqlens=cu) for t in _inputs(cfg, seqlen, device, dtype))
    sinks = torch.linspace(-1.0, 1.0, cfg.heads, device=device) if cfg.sinks else None
    # once, as a model's step does; a range mask carries its own segments
    plan = sp.prepare(q.shape[:2], cu_seqlens=None if mask is not None else cu, device=device, mask=mask)
    attend = lambda q, k, v: sp.attention(  # noqa: E731
        q, k, v, causal=cfg.causal, window_size=tuple(cfg.window), sinks=sinks,
        softcap=cfg.softcap, plan=plan, mask=mask)
    fwd, fwd_bwd = _fwd_bwd(attend, q, k, v)
    t_fwd, t_fwd_bwd = _time(fwd, cfg, device), _time(fwd_bwd, cfg, device)
    with profile.RingProfile() as prof, PeakMemory(device) as mem:
        start = time.perf_counter()
        fwd_bwd()
        _sync(device)
        elapsed = time.perf_counter() - start
    work = prof.scores
    dense = cfg.batch * cfg.heads * (seqlen * (seqlen + 1) // 2 if cfg.causal else seqlen**2)
    planned = {}
    if mask is not None:  # the computed balance of the mask's visible pairs (no communication)
        planned = {"mask_balance": balance.imbalance(balance.mask_work(mask, layout, world))}
    elif cu is not None and strategy == "ring":  # the ring's block schedule for every rank (no communication)
        pw = balance.scheduled_work(cu.cpu(), layout, world, causal=cfg.causal, window_size=tuple(cfg.window))
        planned = {"planned_balance": balance.imbalance(pw.kernel), "needed_balance": balance.imbalance(pw.needed),
                   "masked_share": pw.masked_share, "kernel_calls_per_rank": int(pw.calls.max())}
    if strategy == "ring" and (mask is not None or cu is not None or tuple(cfg.window) != (-1, -1)):
        # the ring runs in lock-step: each step waits for its slowest rank (balance module doc)
        rule = mask if mask is not None else AttentionMask.build(
            seqlen, cfg.causal, None if cu is None else cu.cpu(), tuple(cfg.window))
        planned["lockstep_balance"] = balance.lockstep_imbalance(balance.step_work(rule, layout, world))
    return {**planned,
        "strategy": strategy, "ring_size": sp.ring_size, "ulysses_size": sp.ulysses_size,
        "layout": layout, "world": world, "seqlen": seqlen,
        "fwd_s": t_fwd, "fwd_bwd_s": t_fwd_bwd,
        "fwd_tflops": attention_flops(cfg.batch, seqlen, cfg.heads, cfg.head_dim, cfg.causal, False) / t_fwd / 1e12,
        "fwd_bwd_tflops": attention_flops(cfg.batch, seqlen, cfg.heads, cfg.head_dim, cfg.causal, True) / t_fwd_bwd / 1e12,
        "work_balance": _max_over_ranks(work) / (_reduce(work, dist.ReduceOp.SUM) / world) if work else 1.0,
        # share of the layout's (causal) score pairs that documents/windows let us skip
        "mask_skipped": 1.0 - _reduce(work, dist.ReduceOp.SUM) / dense,
        "ring_steps": int(_max_over_ranks(prof.ring_steps)),
        "comm_wait_share": _max_over_ranks(prof.wait_s / elapsed),
        "sent_mib_per_rank": _max_over_ranks(prof.bytes_sent / 2**20),
        "kernels": kernels_by_block(prof),  # this rank's (rank 0's in the table and JSON)
        "peak_mib_per_rank": _max_over_ranks(mem.peak_bytes / 2**20),
    }


def kernels_by_block(prof: profile.RingProfile) -> dict[str, int]:
    """{"backend/block kind": forward kernel calls} of a profiled run: which kernel ran each
    kind of block (full, causal, window, varlen, mask; see ``BlockTask.kind``)."""
    return {f"{backend}/{kind}": n for (backend, kind), n in sorted(prof.blocks.items())}


def bench_single(cfg, seqlen, device, dtype):
    """The same kernel backend on the whole sequence in one process: the baseline."""
    q, k, v = _inputs(cfg, seqlen, device, dtype)
    kernel = get_backend(cfg.backend, q, softcap=cfg.softcap)
    scale = 1.0 / math.sqrt(cfg.head_dim)
    # With documents/windows the baseline is the library's one-process path (per-document
    # blocks, masks only where a window cuts them); without them the plain (causal) kernel.
    range_mask = _range_mask(cfg, seqlen)
    rule = range_mask or AttentionMask.build(seqlen, cfg.causal, _cu_seqlens(cfg, seqlen, "cpu"),
                                             tuple(cfg.window))
    mask, causal = None, cfg.causal

    class _Single(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, v):
            out, lse = kernel.forward(q, k, v, causal=causal, scale=scale, mask=mask,
                                      softcap=cfg.softcap)
            out = out.to(q.dtype)
            ctx.save_for_backward(q, k, v, out, lse)
            return out

        @staticmethod
        def backward(ctx, dout):
            return kernel.backward(dout, *ctx.saved_tensors, causal=causal, scale=scale, mask=mask,
                                   softcap=cfg.softcap)

    single = _Single.apply
    if not rule.is_plain:
        # planned once, outside the timed calls, as a model's step does
        plan = ringattn.SequenceParallel.single(cfg.backend).prepare(
            q.shape[:2], cu_seqlens=None if range_mask else _cu_seqlens(cfg, seqlen, "cpu"),
            device=device, mask=range_mask)
        single = lambda q, k, v: local_attention(  # noqa: E731
            q, k, v, causal=cfg.causal, window_size=tuple(cfg.window), softmax_scale=scale,
            backend=cfg.backend, softcap=cfg.softcap, plan=plan, mask=range_mask)
    fwd, fwd_bwd = _fwd_bwd(single, q, k, v)
    t_fwd, t_fwd_bwd = _time(fwd, cfg, device, False), _time(fwd_bwd, cfg, device, False)
    with PeakMemory(device) as mem:
        fwd_bwd()
    return {"fwd_s": t_fwd, "fwd_bwd_s": t_fwd_bwd, "peak_mib": mem.peak_bytes / 2**20,
            "kernel": kernel.name}


def run(cfg: BenchmarkConfig) -> list[dict]:
    device = _setup(cfg)
    if device.type == "cpu":
        torch.set_num_threads(cfg.threads_per_rank)
    dtype = cfg.dtype.torch
    rank0 = dist.get_rank() == 0
    rows = []
    for seqlen in cfg.seqlens:
        base = None
        if cfg.baseline:
            base = _baseline(cfg, seqlen, device, dtype)
        for strategy, layout in itertools.product((s.value for s in cfg.strategies), (x.value for x in cfg.layouts)):
            row = bench_ring(cfg, seqlen, layout, device, dtype, strategy)
            if "skipped" in row:
                if rank0:
                    print(f"{strategy} {layout}: skipped ({row['skipped']})", flush=True)
                continue
            if base is not None:
                row["single_fwd_bwd_s"] = base["fwd_bwd_s"]
                row["single_peak_mib"] = base["peak_mib"]
                row["efficiency_fwd"] = base["fwd_s"] / row["world"] / row["fwd_s"]
                row["efficiency_fwd_bwd"] = base["fwd_bwd_s"] / row["world"] / row["fwd_bwd_s"]
            rows.append(row)
            if rank0:
                _print_row(row)
    if rank0:
        out = Path(cfg.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        meta = {"config": asdict(cfg) if not OmegaConf.is_config(cfg) else OmegaConf.to_container(cfg, enum_to_str=True),
                "device": str(device), "torch": torch.__version__,
                "kernel": get_backend(cfg.backend, torch.empty(1, 1, 1, cfg.head_dim, device=device, dtype=dtype),
                                      softcap=cfg.softcap).name}
        out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
        print(f"wrote {out}")
    return rows


def _baseline(cfg, seqlen, device, dtype):
    """Measured on rank 0 alone (the others wait in the broadcast), shared with all ranks."""
    result = [None]
    if dist.get_rank() == 0:
        result = [bench_single(cfg, seqlen, device, dtype)]
    dist.broadcast_object_list(result, src=0)
    return result[0]


_HEADER = (f"{'strategy':<13}{'layout':<11}{'P':>3}{'seqlen':>8}{'fwd ms':>9}{'f+b ms':>9}{'f+b TF/s':>10}"
           f"{'balance':>9}{'steps':>6}{'skip %':>7}{'wait %':>8}{'MiB sent':>10}{'peak MiB':>10}{'1-proc f+b ms':>15}{'eff f+b':>9}")
_printed_header = False


def _print_row(row):
    global _printed_header
    if not _printed_header:
        print(_HEADER)
        _printed_header = True
    shape = {"ring": "", "allgather": "", "ulysses": "", "hybrid": f" {row['ring_size']}x{row['ulysses_size']}"}[row["strategy"]]
    print(f"{row['strategy'] + shape:<13}{row['layout']:<11}{row['world']:>3}{row['seqlen']:>8}{row['fwd_s'] * 1e3:>9.1f}"
          f"{row['fwd_bwd_s'] * 1e3:>9.1f}{row['fwd_bwd_tflops']:>10.3f}{row['work_balance']:>9.2f}"
          f"{row['ring_steps']:>6}{row['mask_skipped'] * 100:>7.1f}{row['comm_wait_share'] * 100:>8.1f}{row['sent_mib_per_rank']:>10.1f}{row['peak_mib_per_rank']:>10.1f}"
          f"{row.get('single_fwd_bwd_s', float('nan')) * 1e3:>15.1f}{row.get('efficiency_fwd_bwd', float('nan')):>9.2f}"
          + (f"  planned balance {row['planned_balance']:.3f}, masked {row['masked_share']:.1%}, "
             f"{row['kernel_calls_per_rank']} calls" if "planned_balance" in row else "")
          + (f"  x the ideal {1 / row['efficiency_fwd_bwd']:.2f}, computed balance {row['mask_balance']:.3f}"
             if "mask_balance" in row and "efficiency_fwd_bwd" in row else "")
          + (f", lock-step balance {row['lockstep_balance']:.3f}" if "lockstep_balance" in row else "")
          + "  kernels " + ", ".join(f"{k} {n}" for k, n in row["kernels"].items()),
          flush=True)


@hydra.main(config_path="../../conf", config_name="benchmarks/attention", version_base="1.3")
def main(cfg) -> None:
    job: BenchmarkConfig = OmegaConf.to_object(cfg)  # runs the checks in __post_init__
    try:
        run(job)
    finally:
        distributed.shutdown()


if __name__ == "__main__":
    main()
