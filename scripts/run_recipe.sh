#!/usr/bin/env bash
# Run a recipe the way a data scientist does: venv activated, log teed into the run folder.
#   bash scripts/run_recipe.sh recipes/x.yaml [key.sub=value ...]
set -euo pipefail
if [ $# -lt 1 ]; then
  echo "usage: scripts/run_recipe.sh RECIPE.yaml [key.sub=value ...] [--run-dir DIR]" >&2
  exit 2
fi
source "$(dirname "${BASH_SOURCE[0]}")/_setup.sh"
log="$(mktemp "${TMPDIR:-/tmp}/banklm-run.XXXXXX.log")"
set +e
banklm run "$@" 2>&1 | tee "$log"
rc=${PIPESTATUS[0]}
set -e
run_dir="$(sed -n 's/^run folder: //p' "$log" | tail -n 1)"
if [ -n "$run_dir" ] && [ -d "$run_dir" ]; then
  mkdir -p "$run_dir/logs"
  mv "$log" "$run_dir/logs/run_recipe-$(date +%Y%m%d-%H%M%S).log"
  echo "log: $run_dir/logs/"
else
  echo "log: $log"
fi
exit "$rc"
