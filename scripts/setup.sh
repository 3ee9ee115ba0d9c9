#!/usr/bin/env bash
# Create .venv with shardcut and its test/calibration extras, at the exact versions of
# requirements.txt (the lock: every package pinned with ==), so a fresh machine gets what CI
# tested, whatever was released since.
# The lock pins torch==2.13.0, the CPU build this machine keeps on disk; letting pip resolve a
# plain `torch` would pull a multi-GB CUDA build instead.
# scripts/upgrade.sh tries the newest releases in another venv and rewrites the lock when the
# suite passes there; this script never installs anything the lock does not name.
# Then llama.cpp's HF-to-GGUF converter for tests/test_gguf.py (scripts/fetch-llama-cpp.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
# pip and the build backend first, then every package of the lock at its exact version
# (torch==2.13.0 among them), then shardcut itself without resolving anything more: nothing
# here installs a version the lock does not name. --no-build-isolation: otherwise pip would
# build shardcut with whatever setuptools was released last.
"$VENV/bin/python" -m pip install --quiet -c requirements.txt pip setuptools
"$VENV/bin/python" -m pip install --quiet -r requirements.txt
"$VENV/bin/python" -m pip install --quiet --no-build-isolation --no-deps -e ".[dev]"
"$VENV/bin/python" -m pip check  # the lock holds every requirement of shardcut[dev], at compatible versions
VENV="$VENV" bash scripts/fetch-llama-cpp.sh
echo "shardcut installed in $VENV: run $VENV/bin/shardcut --help"
