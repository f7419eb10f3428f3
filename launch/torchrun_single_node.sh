#!/usr/bin/env bash
# One machine, N processes: torchrun --standalone (picks a free rendezvous port itself).
#
#   launch/torchrun_single_node.sh parallel.sp_size=8 model=llama3_8b trainer.dtype=bf16
#   NPROC_PER_NODE=2 launch/torchrun_single_node.sh parallel.sp_size=2       # CPU, 2 processes
#   MAX_RESTARTS=3 launch/torchrun_single_node.sh trainer.save_every=100     # survive crashes
#
# Arguments are Hydra overrides, passed through unchanged. Environment:
#   SHUTDOWN_TIMEOUT  seconds the ranks get to save after SIGTERM / SIGUSR1 reaches torchrun
#                     (default 300; then torchrun kills them; a torchrun without
#                     --shutdown-timeout gives them a fixed 30 s)
#   TORCHRUN          the torchrun command (default: python -m torch.distributed.run); the
#                     script asks it (--help) which signal flags it has
#   NPROC_PER_NODE  processes (default: GPUs, or 1 without GPUs)
#   MAX_RESTARTS    torchrun restarts after a failure (default 0); a restart resumes from the
#                   latest checkpoint in the same run dir (outputs/<TORCHELASTIC_RUN_ID>)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

run_torchrun 300 --standalone \
  --nproc-per-node="${NPROC_PER_NODE:-$(default_nproc)}" \
  --max-restarts="${MAX_RESTARTS:-0}" \
  -m recipes.train "$@"
