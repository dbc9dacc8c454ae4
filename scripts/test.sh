#!/usr/bin/env bash
# Set up (first time) and run the whole test suite, slow end-to-end tests included.
# Extra arguments go to pytest (e.g. `bash scripts/test.sh -m "not slow"`).
set -uo pipefail
# The tests check every GGUF in llama.cpp itself, so they install the llamacpp extra (the quickstart does not).
export BANKLM_EXTRAS="${BANKLM_EXTRAS:-dev,llamacpp}"
# ... and then a missing binding fails those tests instead of skipping them
[[ ",$BANKLM_EXTRAS," == *",llamacpp,"* ]] && export BANKLM_REQUIRE_LLAMACPP="${BANKLM_REQUIRE_LLAMACPP:-1}"
source "$(dirname "${BASH_SOURCE[0]}")/_setup.sh" || exit 1
cd "$ROOT"

# The report is checked in a real headless browser (tests/test_governance.py): Debian's chromium.
# Installed here when missing; without apt-get the test fails and says how to install it.
if ! command -v chromium >/dev/null 2>&1 && ! command -v chromium-browser >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1; then
    SUDO=""
    [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1 && SUDO="sudo"
    echo "banklm: installing chromium for the report check (apt-get)" >&2
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq \
      && $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >&2 \
      || echo "banklm: could not install chromium with apt-get: the headless report test will fail" >&2
  else
    echo "banklm: chromium is missing and apt-get is unavailable: install chromium, or the report test fails" >&2
  fi
fi
python -m pytest -q -ra --durations=15 "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
  echo "banklm: pytest collected no tests: failing on purpose" >&2
  exit 1
fi
exit "$rc"
