# Sourced by the launch scripts: put the repository on PYTHONPATH without changing directory,
# so relative paths (data files, outputs/) stay relative to where you run the command.
RINGATTN_REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="${RINGATTN_REPO}${PYTHONPATH:+:${PYTHONPATH}}"

# true if the Hydra overrides ("$@") already set hydra.run.dir
has_run_dir() {
  local a
  for a in "$@"; do
    case "$a" in hydra.run.dir=*|+hydra.run.dir=*|++hydra.run.dir=*) return 0 ;; esac
  done
  return 1
}

# processes per node: one per GPU, or 1 on a CPU-only machine (override with NPROC_PER_NODE)
default_nproc() {
  python -c 'import torch; print(torch.cuda.device_count() or 1)'
}

# torchrun, as this python runs it. TORCHRUN replaces it (e.g. a wrapper your cluster provides).
read -r -a TORCHRUN_CMD <<< "${TORCHRUN:-python -m torch.distributed.run}"

# torchrun forwards the signals it handles to the ranks, then SIGKILLs any rank still running
# SHUTDOWN_TIMEOUT seconds later. The recipe saves a checkpoint on SIGTERM and SIGUSR1
# (trainer.save_on_signal; docs/preemption.md): forward SIGUSR1 too, and leave time for the
# step in flight plus the save. Both flags are recent (--signals-to-handle is not in torch 2.9's
# torchrun, --shutdown-timeout not in 2.10's), and an older torchrun refuses to start when given
# either, so ask this one which it has (one --help). Sets TORCHRUN_SIGNAL_ARGS and USR1_AS: the
# signal to send torchrun when this script gets SIGUSR1 -- SIGTERM where torchrun cannot forward
# SIGUSR1 (unhandled, it would end the agent at once and orphan the ranks; the ranks save on
# SIGTERM the same way).
torchrun_signal_args() {  # $1: default shutdown timeout (seconds)
  local help
  help="$("${TORCHRUN_CMD[@]}" --help 2>/dev/null)" || true
  TORCHRUN_SIGNAL_ARGS=()
  USR1_AS=USR1
  if [[ "$help" == *--signals-to-handle* ]]; then
    TORCHRUN_SIGNAL_ARGS+=(--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1)
  else
    USR1_AS=TERM
    echo "launch: this torchrun has no --signals-to-handle: SIGUSR1 reaches the ranks as SIGTERM" >&2
  fi
  if [[ "$help" == *--shutdown-timeout* ]]; then
    TORCHRUN_SIGNAL_ARGS+=(--shutdown-timeout="${SHUTDOWN_TIMEOUT:-$1}")
  else
    # no environment variable either: TORCH_ELASTIC_SHUTDOWN_TIMEOUT came with the flag
    echo "launch: this torchrun has no --shutdown-timeout: after a signal the ranks get its fixed" \
         "30 s to save, not SHUTDOWN_TIMEOUT=${SHUTDOWN_TIMEOUT:-$1}" >&2
  fi
}

# torchrun with the signal flags it supports, then "$@". Where SIGUSR1 must reach torchrun as
# SIGTERM this shell stays torchrun's parent to translate it (and passes SIGTERM on); else it
# becomes torchrun (exec), so a signal to this script's pid is a signal to torchrun.
run_torchrun() {  # $1: default shutdown timeout, then torchrun's arguments
  torchrun_signal_args "$1"
  shift
  if [[ "$USR1_AS" == USR1 ]]; then
    exec "${TORCHRUN_CMD[@]}" "${TORCHRUN_SIGNAL_ARGS[@]}" "$@"
  fi
  "${TORCHRUN_CMD[@]}" "${TORCHRUN_SIGNAL_ARGS[@]}" "$@" &
  local pid=$! rc=0
  trap "kill -s TERM $pid 2>/dev/null || true" USR1 TERM
  # a trapped signal ends `wait` early: wait again until torchrun has exited
  while true; do
    wait "$pid" && rc=0 || rc=$?
    kill -0 "$pid" 2>/dev/null || break
  done
  exit "$rc"
}

# The status of a job whose run dir is $1 and whose launcher exited with $2: 128+N from the
# run dir's stopped.json when the run saved on signal N and stopped (its ranks then exit 0, so
# that no launcher takes the stop for a failure: recipes.train.exit_status), else $2.
stopped_status() {
  local marker="$1/stopped.json"
  if [[ -f "$marker" ]] && grep -o '"exit_status": *[0-9]*' "$marker" | grep -o '[0-9]*$'; then
    return
  fi
  echo "$2"
}

# Send signal $1 to the recipe's ranks among the descendants of pid $2 (python -m recipes.train),
# not to the launcher processes between; prints how many got it. The ranks agree on a signal in
# the step's all-reduce, so reaching some of them stops all of them, on every node.
signal_ranks() {
  local sig="$1" queue=("$2") p c n=0
  while ((${#queue[@]})); do
    p="${queue[0]}"
    queue=("${queue[@]:1}")
    for c in $(ps -o pid= --ppid "$p" 2>/dev/null); do
      queue+=("$c")
      if [[ " $(ps -o args= -p "$c" 2>/dev/null) " =~ \ -m\ recipes\.train\  ]]; then
        kill -s "$sig" "$c" 2>/dev/null && n=$((n + 1))
      fi
    done
  done
  echo "$n"
}
