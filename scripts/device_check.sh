#!/usr/bin/env bash
# One prepared run for a single lent GPU (the `device` tool): the CUDA kernel paths and a
# GPU benchmark, in one go, with everything it prints kept under ${OUT:-device_out}/.
#   bash scripts/device_check.sh
# Multi-rank NCCL tests need >= 2 GPUs and are skipped on one.
set -uo pipefail
out=${OUT:-device_out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
nvidia-smi -L | tee "$out/gpu.txt"
python -m pytest -q tests/test_kernels.py -k cuda -rs 2>&1 | tee "$out/kernels.log"
# the whole ring (fp32 matrix) on CUDA tensors over NCCL, world of one
python -m pytest -q tests/test_ring_attention.py -k "1-nccl" -rs 2>&1 | tee "$out/ring_cuda.log"
# ring attention on one rank on the GPU, bf16, against the single-process kernel
python -m recipes.benchmark_attention seqlens=[16384,65536] dtype=bf16 heads=32 kv_heads=8 \
    head_dim=128 layouts=[zigzag] strategies=[ring] iters=5 output="$out/bench_bf16.json" \
    2>&1 | tee "$out/bench.log"
# the training recipe on one GPU: NCCL world of one, bf16, MFU in the log line
timeout 300 torchrun --standalone --nproc-per-node 1 -m recipes.train trainer.dtype=bf16 \
    trainer.max_steps=50 hydra.run.dir="$out/train" 2>&1 | tail -20 | tee "$out/train.log"
