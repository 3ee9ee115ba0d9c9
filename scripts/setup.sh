#!/usr/bin/env bash
# Create .venv with shardcut and its test/calibration extras, at the exact versions of
# requirements.txt (the lock: every package pinned with ==, used as pip constraints), so a fresh
# machine gets what CI tested.
# torch is installed first and pinned to 2.13.0, the CPU build this machine keeps on disk;
# letting pip resolve a plain `torch` would pull a multi-GB CUDA build instead.
# scripts/upgrade.sh tries the newest releases and rewrites the lock when the suite passes.
# Then llama.cpp's HF-to-GGUF converter, pinned in requirements/llama-cpp.txt, for tests/test_gguf.py
# (SHARDCUT_LLAMA_CPP=skip leaves it out; those tests then skip, or fail under CI).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
if [ "${LOCK:-}" = none ]; then  # scripts/upgrade.sh: newest releases of everything but torch, which stays the on-disk CPU build
    "$VENV/bin/python" -m pip install --quiet --upgrade pip setuptools
    "$VENV/bin/python" -m pip install --quiet "torch==2.13.0"
    "$VENV/bin/python" -m pip install --quiet --upgrade --upgrade-strategy eager \
        -c <(echo "torch==2.13.0") -e ".[dev]"
else
    # pip and the build backend are locked too: without --no-build-isolation pip would build
    # shardcut with whatever setuptools was released last
    "$VENV/bin/python" -m pip install --quiet -c requirements.txt pip setuptools
    "$VENV/bin/python" -m pip install --quiet -c requirements.txt "torch==2.13.0"
    "$VENV/bin/python" -m pip install --quiet --no-build-isolation -c requirements.txt -e ".[dev]"
fi
LLAMA_PIN=requirements/llama-cpp.txt
LLAMA_VERSION=$(sed -n 's/^llama-cpp-python==\([^ ]*\).*/\1/p' "$LLAMA_PIN")
LLAMA_DIR=.cache/llama.cpp/$LLAMA_VERSION
if [ "${SHARDCUT_LLAMA_CPP:-}" != skip ] && [ ! -f "$LLAMA_DIR/convert_hf_to_gguf.py" ]; then
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    # The source distribution only (--no-binary), hash-checked; it is unpacked, never built.
    "$VENV/bin/python" -m pip download --quiet --no-deps --no-binary :all: --require-hashes -r "$LLAMA_PIN" -d "$tmp"
    src=llama_cpp_python-$LLAMA_VERSION/vendor/llama.cpp
    mkdir -p "$tmp/x"
    tar -xzf "$tmp/llama_cpp_python-$LLAMA_VERSION.tar.gz" -C "$tmp/x" \
        "$src/convert_hf_to_gguf.py" "$src/conversion" "$src/gguf-py/gguf" "$src/src/llama-vocab.cpp" "$src/LICENSE"
    mkdir -p "$tmp/out" "$(dirname "$LLAMA_DIR")"
    mv "$tmp/x/$src/convert_hf_to_gguf.py" "$tmp/x/$src/conversion" "$tmp/x/$src/LICENSE" "$tmp/out/"
    mkdir -p "$tmp/out/gguf-py" && mv "$tmp/x/$src/gguf-py/gguf" "$tmp/out/gguf-py/"
    mv "$tmp/x/$src/src/llama-vocab.cpp" "$tmp/out/"
    rm -rf "$LLAMA_DIR" && mv "$tmp/out" "$LLAMA_DIR"
    echo "llama.cpp converter $LLAMA_VERSION extracted into $LLAMA_DIR"
fi
echo "shardcut installed in $VENV: run $VENV/bin/shardcut --help"
