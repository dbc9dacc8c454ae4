#!/usr/bin/env bash
# Run a recipe the way a data scientist does: venv activated, log teed into the run folder.
#   bash scripts/run_recipe.sh recipes/x.yaml [key.sub=value ...] [--run-dir DIR]
# On several GPUs, through accelerate (launch configs in recipes/accelerate/; wrapper options come first):
#   bash scripts/run_recipe.sh --launch accelerate --config recipes/accelerate/ddp.yaml recipes/x.yaml [overrides]
# runs `accelerate launch --config_file CONFIG -m banklm.cli run RECIPE [overrides] --run-dir DIR`, with one
# run folder chosen here so every process writes to the same place. --dry-run prints the command and exits.
set -euo pipefail
usage="usage: scripts/run_recipe.sh [--launch accelerate --config CONFIG.yaml] [--dry-run] RECIPE.yaml [key.sub=value ...] [--run-dir DIR]"
launch="" config="" dry_run=0
while [ $# -gt 0 ]; do
  case "$1" in
    --launch) [ $# -ge 2 ] || { echo "$usage" >&2; exit 2; }; launch="$2"; shift 2 ;;
    --launch=*) launch="${1#--launch=}"; shift ;;
    --config) [ $# -ge 2 ] || { echo "$usage" >&2; exit 2; }; config="$2"; shift 2 ;;
    --config=*) config="${1#--config=}"; shift ;;
    --dry-run) dry_run=1; shift ;;
    *) break ;;
  esac
done
if [ $# -lt 1 ]; then
  echo "$usage" >&2
  exit 2
fi
if [ -n "$launch" ] && [ "$launch" != "accelerate" ]; then
  echo "run_recipe.sh: --launch $launch: only 'accelerate' is supported" >&2
  exit 2
fi
if [ -n "$config" ] && [ -z "$launch" ]; then
  echo "run_recipe.sh: --config is the accelerate launch config: give --launch accelerate too" >&2
  exit 2
fi
if [ -n "$launch" ]; then
  if [ -z "$config" ]; then
    echo "run_recipe.sh: --launch accelerate needs --config (e.g. recipes/accelerate/ddp.yaml)" >&2
    exit 2
  fi
  if [ ! -f "$config" ]; then
    echo "run_recipe.sh: --config $config: file not found" >&2
    exit 2
  fi
fi

if [ "$dry_run" = 1 ]; then
  py="${PYTHON:-python3}"   # no venv set-up for a dry run
else
  source "$(dirname "${BASH_SOURCE[0]}")/_setup.sh"
  py=python
fi

cmd=(banklm run "$@")
if [ -n "$launch" ]; then
  # every process must use the same run folder: choose it once, unless the caller did
  has_run_dir=0
  for a in "$@"; do
    case "$a" in --run-dir|--run-dir=*) has_run_dir=1 ;; esac
  done
  extra=()
  if [ "$has_run_dir" = 0 ]; then
    run_dir="$("$py" - "$@" <<'PY'
import sys

from banklm.pipeline import default_run_dir
from banklm.recipe import RecipeError, load_recipe

try:
    print(default_run_dir(load_recipe(sys.argv[1], sys.argv[2:])))
except RecipeError as e:
    print(f"banklm: error: {e}", file=sys.stderr)
    sys.exit(2)
PY
)" || exit 2
    extra=(--run-dir "$run_dir")
  fi
  cmd=(accelerate launch --config_file "$config" -m banklm.cli run "$@" "${extra[@]}")
fi

if [ "$dry_run" = 1 ]; then
  printf '%q ' "${cmd[@]}"
  echo
  exit 0
fi

log="$(mktemp "${TMPDIR:-/tmp}/banklm-run.XXXXXX.log")"
set +e
"${cmd[@]}" 2>&1 | tee "$log"
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
