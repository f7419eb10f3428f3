"""Which fused attention kernel is fastest, per dtype and head_dim (forward + backward).

    python -m recipes.benchmarks.kernels                                    # CPU, small
    python -m recipes.benchmarks.kernels seqlens=[8192,16384,32768,65536]   # one GPU

Times torch's fused scaled-dot-product kernels through the public selector
(``torch.nn.attention.sdpa_kernel``): FlashAttention-2, memory-efficient and cuDNN attention
on CUDA, the flash kernel on CPU, and the math fallback, causal, batch 1, GQA expanded.
A kernel that cannot run a configuration is reported as skipped with torch's reason. This
is the measurement ``backend="auto"`` should follow on a GPU (docs/gpu.md).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import hydra
import torch
import torch.nn.functional as F
from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf
from torch.nn.attention import SDPBackend, sdpa_kernel

from recipes.benchmarks.results import report, single_device
from recipes.flops import attention_flops
from recipes.choices import AttnDtype, Choice

KERNELS = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
           "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}
Kernel = Choice("Kernel", {name: name for name in KERNELS})


@dataclass
class KernelBenchConfig:
    seqlens: list[int] = field(default_factory=lambda: [2048])
    dtypes: list[AttnDtype] = field(default_factory=lambda: [AttnDtype.fp32, AttnDtype.bf16])
    head_dims: list[int] = field(default_factory=lambda: [64, 128])
    heads: int = 8
    kernels: list[Kernel] = field(default_factory=lambda: list(Kernel))
    # math materialises (s x s) scores: only timed up to this length
    math_max_seqlen: int = 8192
    warmup: int = 1
    iters: int = 3
    output: str = "bench_results/kernels.json"


ConfigStore.instance().store(name="benchmark_kernels_schema", node=KernelBenchConfig)


def time_kernel(kernel: str, q, k, v, cfg) -> float | str:
    """Seconds per causal forward + backward, or why the kernel cannot run."""
    def step():
        with sdpa_kernel(KERNELS[kernel]):
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        out.backward(torch.ones_like(out))

    try:
        for _ in range(cfg.warmup):
            step()
    except RuntimeError as e:  # "No available kernel" and its reasons, as torch words them
        return str(e).splitlines()[0][:120]
    sync = torch.cuda.synchronize if q.is_cuda else (lambda: None)
    sync()
    start = time.perf_counter()
    for _ in range(cfg.iters):
        step()
    sync()
    return (time.perf_counter() - start) / cfg.iters


def measure(cfg: KernelBenchConfig, device: torch.device) -> list[dict]:
    rows = []
    for dtype in cfg.dtypes:
        for d in cfg.head_dims:
            for s in cfg.seqlens:
                gen = torch.Generator().manual_seed(0)
                q, k, v = (torch.randn(1, cfg.heads, s, d, generator=gen).to(device, AttnDtype(dtype).torch)
                           .requires_grad_() for _ in range(3))
                flops = attention_flops(1, s, cfg.heads, d, causal=True, backward=True)
                for kernel in cfg.kernels:
                    row = {"dtype": str(dtype), "head_dim": d, "seqlen": s, "kernel": str(kernel)}
                    if kernel == "math" and s > cfg.math_max_seqlen:
                        row["skipped"] = f"math above math_max_seqlen={cfg.math_max_seqlen}"
                    else:
                        t = time_kernel(kernel, q, k, v, cfg)
                        row.update({"skipped": t} if isinstance(t, str) else
                                   {"ms": 1e3 * t, "tflops": flops / t / 1e12})
                    rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| dtype | head_dim | seqlen | kernel | fwd+bwd ms | TFLOP/s |", "|---|---|---|---|---|---|"]
    for r in rows:
        tail = f"{r['ms']:.2f} | {r['tflops']:.1f}" if "ms" in r else f"skipped: {r['skipped']} |"
        lines.append(f"| {r['dtype']} | {r['head_dim']} | {r['seqlen']} | {r['kernel']} | {tail} |")
    return "\n".join(lines)


@hydra.main(config_path="../../conf", config_name="benchmarks/kernels", version_base=None)
def main(cfg) -> None:
    cfg: KernelBenchConfig = OmegaConf.to_object(cfg)
    device = single_device()
    rows = measure(cfg, device)
    report(rows, table(rows), cfg.output, device)


if __name__ == "__main__":
    main()
