#!/usr/bin/env bash
# Several machines: run this same command on every node (c10d rendezvous, elastic restarts).
#
#   # on each of 4 nodes (node 0's address in MASTER_ADDR):
#   MASTER_ADDR=node0 NNODES=4 RUN_ID=llama8b-run1 launch/torchrun_multi_node.sh \
#       model=llama3_8b parallel.sp_size=8 trainer.dtype=bf16 deepspeed.zero_stage=3
#
# Arguments are Hydra overrides, passed through unchanged. Environment:
#   SHUTDOWN_TIMEOUT  seconds the ranks get to save after SIGTERM / SIGUSR1 reaches torchrun
#                     (default 300; then torchrun kills them; a torchrun without
#                     --shutdown-timeout gives them a fixed 30 s)
#   TORCHRUN          the torchrun command (default: python -m torch.distributed.run); the
#                     script asks it (--help) which signal flags it has
#   MASTER_ADDR, MASTER_PORT  rendezvous endpoint, a host all nodes reach (port default 29500)
#   NNODES                    nodes (default 1); "MIN:MAX" for an elastic range
#   NPROC_PER_NODE            processes per node (default: GPUs, or 1 without GPUs)
#   RUN_ID                    required, the same on every node: the rendezvous id and the run
#                             dir outputs/$RUN_ID (torchrun's default id "none" would make
#                             every job share outputs/none). Reuse it to resume a stopped job.
#   NODE_RANK                 optional; c10d assigns ranks itself, a static rendezvous needs it
#   MAX_RESTARTS              restarts of the whole job after a failure (default 0); each
#                             resumes from the latest checkpoint
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
: "${MASTER_ADDR:?set MASTER_ADDR to the rendezvous host (e.g. node 0)}"
: "${RUN_ID:?set RUN_ID to one value shared by all nodes (names the rendezvous and outputs/RUN_ID)}"

run_torchrun 300 \
  --nnodes="${NNODES:-1}" \
  ${NODE_RANK:+--node-rank="${NODE_RANK}"} \
  --nproc-per-node="${NPROC_PER_NODE:-$(default_nproc)}" \
  --rdzv-backend=c10d \
  --rdzv-endpoint="${MASTER_ADDR}:${MASTER_PORT:-29500}" \
  --rdzv-id="${RUN_ID}" \
  --max-restarts="${MAX_RESTARTS:-0}" \
  -m recipes.train "$@"
