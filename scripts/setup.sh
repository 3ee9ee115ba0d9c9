#!/usr/bin/env bash
# Create .venv with shardcut and its test/calibration extras, at the exact versions of
# requirements/lock.txt (pip constraints), so a fresh machine gets what CI tested.
# torch is installed first and pinned to 2.13.0, the CPU build this machine keeps on disk;
# letting pip resolve a plain `torch` would pull a multi-GB CUDA build instead.
# scripts/upgrade.sh tries the newest releases and rewrites the lock when the suite passes.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
LOCK=${LOCK:-requirements/lock.txt}
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --upgrade "pip>=24"
"$VENV/bin/python" -m pip install --quiet "torch==2.13.0"
if [ "$LOCK" = none ]; then
    "$VENV/bin/python" -m pip install --quiet --upgrade --upgrade-strategy eager -e ".[dev]"
else
    "$VENV/bin/python" -m pip install --quiet -c "$LOCK" -e ".[dev]"
fi
echo "shardcut installed in $VENV: run $VENV/bin/shardcut --help"
