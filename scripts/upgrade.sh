#!/usr/bin/env bash
# Try the newest releases of every dependency (torch stays at the on-disk 2.13.0 CPU build):
# install them into a scratch venv, run lint and the whole suite there, and only if all pass
# rewrite requirements.txt from that venv. Not part of .ci/run: an upgrade is a
# deliberate change, committed with the lock diff and the suite's result.
#   bash scripts/upgrade.sh            # test the newest releases, update the lock if green
#   bash scripts/upgrade.sh --check    # test only, leave the lock alone
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv-latest}
rm -rf "$VENV"
python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --upgrade pip setuptools
"$VENV/bin/python" -m pip install --quiet "torch==2.13.0"  # the on-disk CPU build, not the newest
"$VENV/bin/python" -m pip install --quiet --upgrade --upgrade-strategy eager -c <(echo "torch==2.13.0") -e ".[dev]"
VENV="$VENV" bash scripts/fetch-llama-cpp.sh
"$VENV/bin/ruff" check shardcut cli tests bench
"$VENV/bin/python" -m pytest -p no:cacheprovider
if [ "${1:-}" != "--check" ]; then
    bash scripts/lock.sh "$VENV"
fi
