#!/usr/bin/env bash
# llama.cpp's HF-to-GGUF converter, pinned and hash-checked in requirements/llama-cpp.txt, for
# tests/test_gguf.py, unpacked into .cache/llama.cpp/<version>/ (setup.sh and upgrade.sh run it).
# SHARDCUT_LLAMA_CPP=skip leaves it out; those tests then skip, or fail under CI.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
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
