#!/usr/bin/env bash
# Write the lock, requirements.txt (every package at an exact version; setup.sh installs it with
# pip install -r), from a venv whose suite passed.
#   bash scripts/lock.sh [VENV]      # default .venv
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-.venv}
{
    echo "# The lock: the exact versions setup.sh and CI install (pip install -r, Python 3.11, Linux x86_64)."
    echo "# Made by scripts/lock.sh from a venv whose whole suite passed; move it with scripts/upgrade.sh."
    "$VENV/bin/python" -m pip freeze --exclude-editable --all | grep -vE '^wheel==' | sed 's/+cpu$//'
} > requirements.txt
# pyproject.toml's build backend follows the lock (isolated builds use it)
SETUPTOOLS=$(sed -n 's/^setuptools==//p' requirements.txt)
sed -i "s/^requires = \[\"setuptools==[^\"]*\"\]/requires = [\"setuptools==$SETUPTOOLS\"]/" pyproject.toml
echo "wrote requirements.txt ($(grep -vc '^#' requirements.txt) packages)"
