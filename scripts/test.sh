#!/usr/bin/env bash
# Set up (first time) and run the whole test suite, slow end-to-end tests included.
# Extra arguments go to pytest (e.g. `bash scripts/test.sh -m "not slow"`).
set -uo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_setup.sh" || exit 1
cd "$ROOT"
python -m pytest -q -ra --durations=15 "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
  echo "banklm: pytest collected no tests: failing on purpose" >&2
  exit 1
fi
exit "$rc"
