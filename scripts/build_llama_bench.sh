#!/usr/bin/env bash
# Build llama.cpp's C++ `llama-bench` from the same llama-cpp-python sdist and CMake flags as the project's wheel,
# into ~/.cache/edgespec/llama-bench (about 10 minutes on 2 cores, once). Prints the binary's path.
# Used as the C++ plain-decoding baseline: `edgespec bench --llama-bench "$(bash scripts/build_llama_bench.sh)"`.
set -euo pipefail
cd "$(dirname "$0")/.."
LLAMA_VERSION=0.3.36
DIR="${EDGESPEC_HOME:-${XDG_CACHE_HOME:-$HOME/.cache}/edgespec}/llama-bench"
ARGS=$(.venv/bin/python scripts/llama_cmake_args.py)
BIN="$DIR/build/bin/llama-bench"
if [ ! -x "$BIN" ] || [ "$(cat "$DIR/.args" 2>/dev/null)" != "$ARGS" ]; then
  mkdir -p "$DIR"
  [ -f "$DIR/llama_cpp_python-$LLAMA_VERSION.tar.gz" ] || \
    .venv/bin/python -m pip download -q --no-deps --no-binary llama-cpp-python "llama-cpp-python==$LLAMA_VERSION" -d "$DIR" >&2
  [ -d "$DIR/llama_cpp_python-$LLAMA_VERSION" ] || tar xzf "$DIR/llama_cpp_python-$LLAMA_VERSION.tar.gz" -C "$DIR"
  # the AMX tile-config fix (it touches only code compiled with AMX on, so other builds are unchanged)
  .venv/bin/python scripts/patch_llama.py "$DIR/llama_cpp_python-$LLAMA_VERSION"
  # shellcheck disable=SC2086
  cmake -S "$DIR/llama_cpp_python-$LLAMA_VERSION/vendor/llama.cpp" -B "$DIR/build" $ARGS -DCMAKE_BUILD_TYPE=Release \
    -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_EXAMPLES=OFF >&2
  cmake --build "$DIR/build" -j"$(nproc)" --target llama-bench >&2
  echo "$ARGS" > "$DIR/.args"
fi
echo "$BIN"
