#!/usr/bin/env bash
# Create .venv with shardcut and its test/calibration extras.
# torch is installed first and pinned to 2.13.0, the CPU build this machine keeps on disk;
# letting pip resolve a plain `torch` would pull a multi-GB CUDA build instead.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet "torch==2.13.0"
.venv/bin/python -m pip install --quiet -e ".[dev]"
echo "shardcut installed in .venv: run .venv/bin/shardcut --help"
