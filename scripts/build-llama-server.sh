#!/usr/bin/env bash
# Build llama.cpp's llama-server (CPU only) from the source that the llama-cpp-python sdist
# on PyPI vendors, and cache the binary. Prints the binary's path on stdout.
#   LLAMA_CPP_PY_VERSION  the sdist version (default 0.3.36)
#   LLM_SUPERVISOR_CACHE  cache directory (default ~/.cache/llm-supervisor)
set -euo pipefail
VER=${LLAMA_CPP_PY_VERSION:-0.3.36}
CACHE=${LLM_SUPERVISOR_CACHE:-$HOME/.cache/llm-supervisor}
OUT=$CACHE/llama-server-$VER
BIN=$OUT/llama-server
if [ -x "$BIN" ] && "$BIN" --version >/dev/null 2>&1; then
  echo "$BIN"; exit 0
fi
for tool in cmake ninja g++; do
  command -v "$tool" >/dev/null || { echo "build-llama-server: $tool is missing (apt-get install -y cmake ninja-build g++)" >&2; exit 1; }
done
WORK=$(mktemp -d "${TMPDIR:-/tmp}/llama-build.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
PY=${PYTHON:-python3}
echo "build-llama-server: building llama-server $VER once (cached in $OUT; minutes on 2 cores)" >&2
"$PY" -m pip download --quiet --no-deps --no-binary :all: "llama-cpp-python==$VER" -d "$WORK/dl" >&2
tar xzf "$WORK/dl/llama_cpp_python-$VER.tar.gz" -C "$WORK"
SRC=$WORK/llama_cpp_python-$VER/vendor/llama.cpp
cmake -S "$SRC" -B "$WORK/build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
  -DGGML_NATIVE=OFF -DBUILD_SHARED_LIBS=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
  -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_CURL=OFF >&2
cmake --build "$WORK/build" --target llama-server -j"$(nproc)" >&2
mkdir -p "$OUT"
cp "$WORK/build/bin/llama-server" "$BIN.tmp" && mv "$BIN.tmp" "$BIN"
echo "$BIN"
