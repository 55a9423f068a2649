#!/usr/bin/env bash
# Runs the test suite. pytest's exit code 5 ("no tests collected") is an error here: a suite
# that runs nothing must not pass silently.
set -uo pipefail
cd "$(dirname "$0")/.."
.venv/bin/python -m pytest -q "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
  echo "error: pytest collected no tests" >&2
  exit 1
fi
exit "$rc"
