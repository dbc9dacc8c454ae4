#!/usr/bin/env bash
# Set up (first time) and run the quickstart recipe end to end on CPU; prints where the report is.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_setup.sh"
cd "$ROOT"
banklm run recipes/quickstart.yaml "$@"
