#!/usr/bin/env bash
# Set up a virtual environment in .venv with the CPU build of torch pinned, then the package.
# Idempotent: a second run only checks what is there.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
export PIP_CONSTRAINT="$PWD/constraints.txt"   # also applies inside isolated build environments
export PIP_DISABLE_PIP_VERSION_CHECK=1
stamp=.venv/.xray2ct-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ constraints.txt -nt "$stamp" ]; then
  # torch first and exactly pinned: a bare `torch` would pull the newest CUDA build (GBs).
  .venv/bin/python -m pip install -q "torch==2.13.0"
  .venv/bin/python -m pip install -q -e ".[dev,bench]"
  touch "$stamp"
fi
