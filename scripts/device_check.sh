#!/usr/bin/env bash
# One prepared run for a single GPU: CUDA correctness, the kernel and
# virtual-ring benchmarks, and a one-GPU training run, with everything kept under ${OUT}/.
#   bash scripts/device_check.sh                 # on the GPU machine
#   SMALL=1 bash scripts/device_check.sh         # dry run of every line on CPU, small sizes
# Multi-rank NCCL tests need >= 2 GPUs and are skipped on one. The GPU machine has no
# hydra/omegaconf/deepspeed: carry their wheels and install them first (docs/gpu.md).
set -uo pipefail
out=${OUT:-device_out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
if [ "${SMALL:-0}" = 1 ]; then
  seqs="[1024]"; vr_seqs="[2048]"; vr_shape="heads=4 kv_heads=2 head_dim=64 dtype=fp32"
  bench_shape="seqlens=[2048] dtype=fp32 heads=4 kv_heads=2 head_dim=64"
  train_steps=2; train_len=256; model=tiny
else
  nvidia-smi -L | tee "$out/gpu.txt"
  seqs="[8192,16384,32768,65536]"; vr_seqs="[32768,131072]"
  vr_shape="heads=32 kv_heads=8 head_dim=128 dtype=bf16"
  bench_shape="seqlens=[16384,65536] dtype=bf16 heads=32 kv_heads=8 head_dim=128"
  train_steps=30; train_len=16384; model=llama3_1b
fi
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())" | tee "$out/torch.txt"
# 1. CUDA correctness: kernels vs float64 (fp32/bf16/fp16), the ring at world 1 over NCCL
python -m pytest -q tests/test_kernels.py -rs 2>&1 | tee "$out/kernels.log"
python -m pytest -q tests/test_ring_attention.py -k "1-nccl or 1-gloo" -rs 2>&1 | tee "$out/ring_cuda.log"
# 2. the fastest fused kernel per dtype and head_dim
python -m recipes.benchmarks.kernels seqlens="$seqs" dtypes=[fp32,bf16,fp16] output="$out/kernels.json" \
    hydra.run.dir="$out/hydra_kernels" 2>&1 | tee "$out/kernels_bench.log"
# 3. blockwise efficiency of the ring's schedule (P = 2, 4, 8) against one fused call
python -m recipes.benchmarks.virtual_ring seqlens="$vr_seqs" worlds=[2,4,8] $vr_shape \
    output="$out/virtual_ring.json" hydra.run.dir="$out/hydra_vr" 2>&1 | tee "$out/virtual_ring.log"
# ring attention on one rank against the single-process kernel
python -m recipes.benchmarks.attention $bench_shape layouts=[zigzag] strategies=[ring] iters=3 \
    output="$out/bench_attention.json" hydra.run.dir="$out/hydra_bench" 2>&1 | tee "$out/bench.log"
# 4. the training recipe on one GPU: NCCL world of one, bf16 on GPU, MFU in the log line
timeout 300 torchrun --standalone --nproc-per-node 1 -m recipes.train model=$model \
    trainer.dtype=$([ "${SMALL:-0}" = 1 ] && echo fp32 || echo bf16) model.activation_checkpointing=true \
    data.seq_len=$train_len data.global_batch_size=1 trainer.max_steps=$train_steps trainer.log_every=5 \
    trainer.eval_every=0 hydra.run.dir="$out/train" 2>&1 | tail -20 | tee "$out/train.log"
