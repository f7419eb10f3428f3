#!/usr/bin/env bash
# The CUDA checks for one GPU, everything kept under ${OUT:-device_out}/ (docs/gpu.md).
#   bash scripts/device_check.sh [--wheels DIR] [--dry-run]
# --wheels DIR  install every wheel in DIR (no package index: the GPU machine may reach none)
#               into $OUT/site, first on PYTHONPATH; e.g. hydra-core, omegaconf, antlr4 for the
#               recipe-level checks and the benchmarks (docs/gpu.md shows the `pip download`).
# --dry-run     where there is no CUDA device, run it anyway: the CUDA-only tests skip, each
#               with its reason, and the benchmarks (GPU numbers only) are left out.
# Without CUDA and without --dry-run it stops at once (exit 2) saying so.
# One GPU cannot run multi-rank NCCL: the NCCL checks use a world of one.
set -uo pipefail
out=${OUT:-device_out}
wheels="" dry=0
while [ $# -gt 0 ]; do
  case "$1" in
    --wheels) [ $# -ge 2 ] || { echo "device_check: --wheels needs a directory" >&2; exit 2; }
              wheels=$2; shift 2 ;;
    --dry-run) dry=1; shift ;;
    *) echo "device_check: unknown argument '$1' (use --wheels DIR, --dry-run)" >&2; exit 2 ;;
  esac
done
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
if [ -n "$wheels" ]; then
  compgen -G "$wheels/*.whl" >/dev/null || { echo "device_check: no wheels (*.whl) in '$wheels'" >&2; exit 2; }
  # --no-deps: exactly the carried wheels; nothing may pull another torch over the GPU build
  python -m pip install --quiet --no-index --no-deps --target "$out/site" "$wheels"/*.whl \
    || { echo "device_check: installing the wheels in '$wheels' failed" >&2; exit 2; }
  export PYTHONPATH="$PWD/$out/site:$PWD"
fi
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', int(torch.cuda.is_available()))" \
  > "$out/torch.txt" || exit 2
cat "$out/torch.txt"
cuda=$(awk '{print $NF}' "$out/torch.txt")
if [ "$cuda" != 1 ] && [ "$dry" != 1 ]; then
  echo "device_check: no CUDA device here (torch.cuda.is_available() is False); nothing to check." \
       "Run it on a GPU, or pass --dry-run to exercise the script (CUDA-only tests skip)." >&2
  exit 2
fi
[ "$cuda" = 1 ] && nvidia-smi -L | tee "$out/gpu.txt"
status=0
# 1. the CUDA path against float64: torch's fused CUDA kernels (flash, memory-efficient, cuDNN),
#    ringattn's kernels on CUDA, the merge over rows a block hides entirely, the ring at P = 1
#    over NCCL and a virtual ring with plans and masks on the GPU, events, offload, NCCL setup
python -m pytest -q -rs tests/test_gpu.py tests/test_kernels.py --junitxml="$out/tests.xml" 2>&1 \
  | tee "$out/tests.log"
[ "${PIPESTATUS[0]}" = 0 ] || status=1
# 2. GPU numbers (need hydra: carry its wheels): every ringattn kernel backend this GPU runs
#    (fa3, flash_attn, torch_varlen and torch's FA3/FA4 where installed, sdpa, math) per block
#    kind against float64, timed (the rows the auto table in ringattn/kernels/choice.py should
#    follow); the fastest fused kernel per dtype, and the blockwise efficiency of the ring's
#    exact schedule on one GPU (P = 2, 4, 8)
if [ "$cuda" = 1 ]; then
  if python -c "import hydra, omegaconf" 2>/dev/null; then
    for dt in bf16 fp16; do
      python -m recipes.benchmarks.backends seqlen=8192 heads=16 kv_heads=4 head_dim=128 dtype=$dt \
        output="$out/backends_$dt.json" hydra.run.dir="$out/hydra_backends" 2>&1 | tee "$out/backends_$dt.log"
      [ "${PIPESTATUS[0]}" = 0 ] || status=1
    done
    python -m recipes.benchmarks.kernels seqlens="[8192,16384,32768]" dtypes=[bf16,fp16] \
      output="$out/kernels.json" hydra.run.dir="$out/hydra_kernels" 2>&1 | tee "$out/kernels_bench.log"
    python -m recipes.benchmarks.virtual_ring seqlens="[32768,131072]" worlds=[2,4,8] heads=32 \
      kv_heads=8 head_dim=128 dtype=bf16 output="$out/virtual_ring.json" \
      hydra.run.dir="$out/hydra_vr" 2>&1 | tee "$out/virtual_ring.log"
  else
    echo "device_check: benchmarks skipped: hydra/omegaconf not importable (carry their wheels: --wheels DIR)" \
      | tee "$out/benchmarks_skipped.txt"
  fi
fi
exit $status
