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

# torchrun forwards the signals it handles to the ranks, then SIGKILLs any rank still running
# SHUTDOWN_TIMEOUT seconds later. The recipe saves a checkpoint on SIGTERM and SIGUSR1
# (trainer.save_on_signal; docs/preemption.md): forward SIGUSR1 too, and leave time for the
# step in flight plus the save.
TORCHRUN_SIGNAL_ARGS=(--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1
                      --shutdown-timeout="${SHUTDOWN_TIMEOUT:-300}")
