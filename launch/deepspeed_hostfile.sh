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
#
# Signals (docs/preemption.md): send SIGUSR1 or SIGTERM to this script, not to the launcher.
# The script passes it to the ranks it started on this machine, which agree on it in the
# step's all-reduce (so every node stops), save a checkpoint at the same step, write
# <run dir>/stopped.json and exit 0; the launcher sees every rank end well and ends, and the
# script exits 128+N. The launcher itself must not get the signal: it has no SIGUSR1 handler
# (the signal would end it and orphan the ranks), and on SIGTERM or SIGINT it terminates its
# ranks one after the other, each given a hard-coded 30 s before SIGKILL
# (deepspeed/launcher/launch.py, terminate_process_tree) -- too short for a large save. When
# the ranks run on other hosts only (pdsh over ssh), send the signal to a rank there
# (pkill -USR1 -f 'm recipes.train' on one node is enough), or use torchrun (launch/).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

ds_args=(${DS_ARGS:-})
if [[ " ${DS_ARGS:-} " == *" --no_ssh "* && -z "${RUN_DIR:-}" ]] && ! has_run_dir "$@"; then
  echo "launch/deepspeed_hostfile.sh: with --no_ssh every node runs its own launcher; set RUN_DIR" \
       "to one path for all of them" >&2
  exit 2
fi
run_dir=()
run_path="${RUN_DIR:-outputs/ds-$(date +%Y-%m-%d_%H-%M-%S)}"
if has_run_dir "$@"; then
  for a in "$@"; do
    case "$a" in hydra.run.dir=*|+hydra.run.dir=*|++hydra.run.dir=*) run_path="${a#*hydra.run.dir=}" ;; esac
  done
else
  run_dir=("hydra.run.dir=${run_path}")
fi
hostfile=()
if [[ -n "${HOSTFILE:-}" && ! -f "${HOSTFILE}" ]]; then
  echo "launch/deepspeed_hostfile.sh: HOSTFILE=${HOSTFILE} not found" >&2
  exit 2
elif [[ -f "${HOSTFILE:-hostfile}" ]]; then
  hostfile=(--hostfile "${HOSTFILE:-hostfile}")
fi

# ${a[@]+"${a[@]}"}: empty arrays under set -u on bash < 4.4
deepspeed ${hostfile[@]+"${hostfile[@]}"} \
  ${MASTER_ADDR:+--master_addr "${MASTER_ADDR}"} \
  --master_port "${MASTER_PORT:-29500}" \
  ${ds_args[@]+"${ds_args[@]}"} \
  --module recipes.train ${run_dir[@]+"${run_dir[@]}"} "$@" &
launcher=$!
to_ranks() {  # $1: the signal this script got
  local n
  n="$(signal_ranks "$1" "$launcher")"
  echo "launch/deepspeed_hostfile.sh: SIG$1 passed to ${n} rank(s) on this machine, not to the launcher:" \
       "every rank finishes its step and saves a checkpoint" >&2
  [[ "$n" != 0 ]] || echo "launch/deepspeed_hostfile.sh: no rank of this run runs here; signal one on its host" >&2
}
trap 'to_ranks USR1' USR1
trap 'to_ranks TERM' TERM
# in the background so the traps run at once; a trapped signal ends `wait` early: wait again
rc=0
while true; do
  wait "$launcher" && rc=0 || rc=$?
  kill -0 "$launcher" 2>/dev/null || break
done
exit "$(stopped_status "$run_path" "$rc")"
