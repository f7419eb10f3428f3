"""Each ringattn kernel backend this device runs, against float64 and timed, per block kind.

    python -m recipes.benchmarks.backends                        # CPU: sdpa and math only
    python -m recipes.benchmarks.backends seqlen=16384 dtype=bf16   # one GPU (scripts/device_check.sh)

For every backend in ``ringattn.kernels.BACKENDS`` (and, where installed, ``torch_varlen`` with
torch's FA3 / FA4 activated) and every block kind the planner makes (full, top-left causal, a
window band, packed documents as varlen, softcap), one block forward + backward from the
final out/lse, as the ring drives it: the max relative error of out, lse, dq, dk, dv against
``math`` in float64, whether it is within the dtype's tolerance, and milliseconds. A backend
or kind that cannot run here is a row with the reason. These rows are what the ``auto`` table
(ringattn/kernels/choice.py) should be ordered by on each GPU generation.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import hydra
import torch
from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from recipes.benchmarks.results import report, single_device
from recipes.choices import AttnDtype
from ringattn.kernels import BACKENDS, choice, missing_feature

# max relative error of a block vs float64 that counts as correct, per input dtype (the
# kernels accumulate in fp32; bf16 keeps 8 bits of mantissa, fp16 11)
TOLERANCE = {"fp32": 1e-4, "bf16": 3e-2, "fp16": 5e-3}


@dataclass
class BackendBenchConfig:
    seqlen: int = 256
    heads: int = 8
    kv_heads: int = 2
    head_dim: int = 64
    dtype: AttnDtype = AttnDtype.fp32
    window: int = 64  # the band's left side (right 0)
    documents: int = 4  # equal documents of the varlen block
    softcap: float = 30.0
    iters: int = 3
    output: str = "bench_results/backends.json"


ConfigStore.instance().store(name="benchmark_backends_schema", node=BackendBenchConfig)


def _kinds(cfg):
    """(kind, kernel keywords, needs) of the block kinds the planner makes."""
    s, n = cfg.seqlen, cfg.documents
    bounds = tuple(i * s // n for i in range(n + 1))
    return [("full", dict(causal=False), {}),
            ("causal", dict(causal=True), {}),
            ("window", dict(causal=False, window=(cfg.window, 0)), dict(window=True)),
            ("varlen", dict(causal=False, window=(-1, 0), segments=(bounds, bounds)), dict(varlen=True)),
            ("softcap", dict(causal=True, softcap=cfg.softcap), dict(softcap=cfg.softcap))]


def _candidates(device):
    """(label, backend, torch impl) of what to run: every backend, plus torch's FA3/FA4."""
    rows = [(name, name, None) for name in BACKENDS]
    rows += [(f"torch_varlen+{impl}", "torch_varlen", impl) for impl in choice.TORCH_IMPL_MODULES
             if choice.torch_impl_available(impl)]
    return rows


def _run(backend, q, k, v, do, scale, kw, iters, sync):
    out, lse = backend.forward(q, k, v, scale=scale, **kw)
    grads = backend.backward(do, q, k, v, out, lse, scale=scale, **kw)
    sync()
    start = time.perf_counter()
    for _ in range(iters):
        o, l_ = backend.forward(q, k, v, scale=scale, **kw)
        backend.backward(do, q, k, v, o, l_, scale=scale, **kw)
    sync()
    return (out, lse, *grads), (time.perf_counter() - start) / iters


def _error(got, want) -> float:
    """max over out, lse, dq, dk, dv of max |got - want| / max |want| (lse on rows that see a key)."""
    errs = []
    for g, w in zip(got, want):
        g, w = g.double(), w.double()
        finite = torch.isfinite(w)
        g, w = g[finite], w[finite]
        errs.append(((g - w).abs().max() / w.abs().max().clamp_min(1e-30)).item() if w.numel() else 0.0)
    return max(errs)


def measure(cfg: BackendBenchConfig, device: torch.device) -> list[dict]:
    dtype = AttnDtype(cfg.dtype).torch
    gen = torch.Generator().manual_seed(0)
    ref = [torch.randn(1, cfg.seqlen, h, cfg.head_dim, generator=gen, dtype=torch.float64)
           for h in (cfg.heads, cfg.kv_heads, cfg.kv_heads, cfg.heads)]
    q, k, v, do = (t.to(device, dtype) for t in ref)
    ref = [t.to(device) for t in ref]
    scale = cfg.head_dim ** -0.5
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    rows = []
    for label, name, impl in _candidates(device):
        if impl is not None:
            from torch.nn.attention import activate_flash_attention_impl

            activate_flash_attention_impl(impl)
        try:
            for kind, kw, needs in _kinds(cfg):
                row = {"backend": label, "kind": kind, "dtype": str(cfg.dtype), "seqlen": cfg.seqlen}
                why = missing_feature(BACKENDS[name], q, **needs)
                if why is not None:
                    rows.append({**row, "skipped": why})
                    continue
                m = BACKENDS["math"]
                want_out, want_lse = m.forward(*ref[:3], scale=scale, **kw)
                want = (want_out, want_lse, *m.backward(ref[3], *ref[:3], want_out, want_lse, scale=scale, **kw))
                try:
                    got, t = _run(BACKENDS[name], q, k, v, do, scale, kw, cfg.iters, sync)
                except (RuntimeError, TypeError, ValueError) as e:
                    rows.append({**row, "skipped": f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"})
                    continue
                err = _error(got, want)
                rows.append({**row, "max_rel_err": err, "ok": err <= TOLERANCE[str(cfg.dtype)], "ms": 1e3 * t})
        finally:
            if impl is not None:
                from torch.nn.attention import restore_flash_attention_impl

                restore_flash_attention_impl(_raise_warn=False)
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| backend | kind | dtype | seqlen | max rel err vs float64 | ok | fwd+bwd ms |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        tail = (f"{r['max_rel_err']:.1e} | {'yes' if r['ok'] else 'NO'} | {r['ms']:.2f}" if "ms" in r
                else f"skipped: {r['skipped']} | | ")
        lines.append(f"| {r['backend']} | {r['kind']} | {r['dtype']} | {r['seqlen']} | {tail} |")
    return "\n".join(lines)


@hydra.main(config_path="../../conf", config_name="benchmarks/backends", version_base=None)
def main(cfg) -> None:
    cfg: BackendBenchConfig = OmegaConf.to_object(cfg)
    device = single_device()
    rows = measure(cfg, device)
    report(rows, table(rows), cfg.output, device)
    if any(r.get("ok") is False for r in rows):
        raise SystemExit("a backend is outside its tolerance against float64 (rows with ok: NO)")


if __name__ == "__main__":
    main()
