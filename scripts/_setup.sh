#!/usr/bin/env bash
# Shared set-up: create .venv if absent and install banklm with the exact tested versions.
# Sourced by quickstart.sh, test.sh and run_recipe.sh. Re-installs only when pyproject/constraints change.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${BANKLM_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export HF_HOME="${HF_HOME:-$ROOT/.hf_home}"
export PIP_DISABLE_PIP_VERSION_CHECK=1

if [ ! -x "$VENV/bin/python" ]; then
  echo "banklm: creating $VENV" >&2
  "$PY" -m venv "$VENV"
fi
# Extras: dev by default; scripts/test.sh adds llamacpp (llama.cpp checks of the GGUFs: compiles ~7 min once).
EXTRAS="${BANKLM_EXTRAS:-dev}"
stamp="$VENV/.banklm-installed-${EXTRAS//,/-}"
want="$(cat "$ROOT/pyproject.toml" "$ROOT/constraints.txt" | sha256sum | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "banklm: installing dependencies [$EXTRAS] (first time: about 2 minutes$(
    [[ ",$EXTRAS," == *",llamacpp,"* ]] && echo "; compiling llama.cpp adds about 7"))" >&2
  # torch first, pinned: a bare torch requirement would pull a multi-GB CUDA build.
  "$VENV/bin/python" -m pip install -q "torch==2.13.0"
  "$VENV/bin/python" -m pip install -q -c "$ROOT/constraints.txt" -e "$ROOT[$EXTRAS]"
  echo "$want" > "$stamp"
fi
# shellcheck disable=SC1091
source "$VENV/bin/activate"
