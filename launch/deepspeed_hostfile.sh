#!/usr/bin/env bash
# The DeepSpeed launcher: one command on the head node starts every rank over ssh (pdsh).
#
#   printf 'node0 slots=8\nnode1 slots=8\n' > hostfile
#   HOSTFILE=hostfile launch/deepspeed_hostfile.sh model=llama3_8b parallel.sp_size=8 trainer.dtype=bf16
#   DS_ARGS="--num_gpus 2" launch/deepspeed_hostfile.sh parallel.sp_size=2   # one machine, no hostfile
#
# Arguments are Hydra overrides, passed through unchanged (the launcher's --local_rank=N is
# accepted by the recipe). The deepspeed launcher has no shared run id, so the run dir is
# fixed here, once, and passed to every rank as hydra.run.dir. Environment:
#   HOSTFILE      "host slots=N" lines (default ./hostfile; absent: this machine only)
#   MASTER_ADDR   rank 0's address (default: DeepSpeed asks the first host over ssh)
#   MASTER_PORT   default 29500
#   RUN_DIR       run dir (default outputs/ds-<date_time>); set it again to resume. Needed
#                 when each node starts its own launcher (DS_ARGS="--no_ssh --node_rank=N").
#   DS_ARGS       extra launcher arguments (--num_gpus, --include, --launcher openmpi, ...)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

ds_args=(${DS_ARGS:-})
if [[ " ${DS_ARGS:-} " == *" --no_ssh "* && -z "${RUN_DIR:-}" ]] && ! has_run_dir "$@"; then
  echo "launch/deepspeed_hostfile.sh: with --no_ssh every node runs its own launcher; set RUN_DIR" \
       "to one path for all of them" >&2
  exit 2
fi
run_dir=()
if ! has_run_dir "$@"; then
  run_dir=("hydra.run.dir=${RUN_DIR:-outputs/ds-$(date +%Y-%m-%d_%H-%M-%S)}")
fi
hostfile=()
if [[ -n "${HOSTFILE:-}" && ! -f "${HOSTFILE}" ]]; then
  echo "launch/deepspeed_hostfile.sh: HOSTFILE=${HOSTFILE} not found" >&2
  exit 2
elif [[ -f "${HOSTFILE:-hostfile}" ]]; then
  hostfile=(--hostfile "${HOSTFILE:-hostfile}")
fi

# ${a[@]+"${a[@]}"}: empty arrays under set -u on bash < 4.4
exec deepspeed ${hostfile[@]+"${hostfile[@]}"} \
  ${MASTER_ADDR:+--master_addr "${MASTER_ADDR}"} \
  --master_port "${MASTER_PORT:-29500}" \
  ${ds_args[@]+"${ds_args[@]}"} \
  --module recipes.train ${run_dir[@]+"${run_dir[@]}"} "$@"
