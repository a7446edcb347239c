#!/usr/bin/env bash
# Set up ./.venv with edgespec and a llama-cpp-python built for this CPU (Metal on Apple Silicon).
# The llama-cpp-python wheel is built once per (version, flags, platform, Python) and cached under
# ~/.cache/edgespec/wheels, so a second run takes seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
LLAMA_VERSION=0.3.36
EXTRAS=${EDGESPEC_EXTRAS:-dev}
"$PY" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else "edgespec needs Python 3.10 or newer")'
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
ARGS=$(.venv/bin/python scripts/llama_cmake_args.py)
PATCH=""  # builds with AMX (EDGESPEC_AMX=1) compile a patched source: scripts/patch_llama.py
case "$ARGS" in *GGML_AMX_INT8=ON*) PATCH="|$(sha256sum scripts/patch_llama.py | cut -c1-16)" ;; esac
KEY=$(printf '%s|%s|%s|%s%s' "$LLAMA_VERSION" "$ARGS" "$(uname -sm)" "$(.venv/bin/python -c 'import sys; print(sys.version_info[:2])')" "$PATCH" | sha256sum | cut -c1-16)
WHEELS="${EDGESPEC_HOME:-${XDG_CACHE_HOME:-$HOME/.cache}/edgespec}/wheels/$KEY"
if [ "$(cat .venv/.llama_key 2>/dev/null)" != "$KEY" ]; then
  if ! ls "$WHEELS"/llama_cpp_python-*.whl >/dev/null 2>&1; then
    echo "Building llama-cpp-python $LLAMA_VERSION for this machine with: $ARGS"
    echo "(this takes about 10-15 minutes on 2 cores, once)"
    rm -rf "$WHEELS.tmp"
    SRC="llama-cpp-python==$LLAMA_VERSION"
    if [ -n "$PATCH" ]; then
      rm -rf "$WHEELS.src" && mkdir -p "$WHEELS.src"
      .venv/bin/python -m pip download -q --no-deps --no-binary llama-cpp-python "$SRC" -d "$WHEELS.src"
      tar xzf "$WHEELS.src/llama_cpp_python-$LLAMA_VERSION.tar.gz" -C "$WHEELS.src"
      SRC="$WHEELS.src/llama_cpp_python-$LLAMA_VERSION"
      .venv/bin/python scripts/patch_llama.py "$SRC"
    fi
    CMAKE_ARGS="$ARGS" .venv/bin/python -m pip wheel --no-deps --no-cache-dir --no-binary llama-cpp-python \
      -w "$WHEELS.tmp" "$SRC"
    mkdir -p "$(dirname "$WHEELS")" && rm -rf "$WHEELS" && mv "$WHEELS.tmp" "$WHEELS"
  fi
  .venv/bin/python -m pip install -q --force-reinstall --no-deps "$WHEELS"/llama_cpp_python-*.whl
  echo "$KEY" > .venv/.llama_key
fi
.venv/bin/python -m pip install -q -e ".[$EXTRAS]"
echo "edgespec is set up in .venv ($(.venv/bin/edgespec --version 2>/dev/null || echo 'edgespec'))"
