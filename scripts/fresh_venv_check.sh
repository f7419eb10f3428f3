#!/usr/bin/env bash
# Run a README command the way a new user would: a fresh clone of this repository's committed
# HEAD in a temporary directory, a new virtualenv, then the command (default: the README's
# test command, `bash .ci/run`, which installs torch and '.[dev]' and runs every test).
#   bash scripts/fresh_venv_check.sh
#   bash scripts/fresh_venv_check.sh "python -m pip install torch==2.13.0 && python -m pip install -e '.[train]' && python -m recipes.train trainer.max_steps=20"
# Uncommitted changes are not included (it clones). KEEP=1 keeps the directory for a look.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cmd=${1:-bash .ci/run}
work=$(mktemp -d "${TMPDIR:-/tmp}/ringattn-fresh.XXXXXX")
[ "${KEEP:-0}" = 1 ] || trap 'rm -rf "$work"' EXIT
git clone --quiet "$repo" "$work/ringattn"
python3 -m venv "$work/venv"
# shellcheck disable=SC1091
source "$work/venv/bin/activate"
cd "$work/ringattn"
echo "fresh clone of $(git rev-parse --short HEAD) in $work/ringattn, python $(python --version 2>&1)"
start=$SECONDS
bash -c "$cmd"
echo "ok: '$cmd' passed in $((SECONDS - start)) s"
