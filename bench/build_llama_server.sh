#!/usr/bin/env bash
# Build llama.cpp's own `llama-server` from the llama.cpp sources vendored in the
# llama-cpp-python sdist of the given (installed) version, so that the benchmark
# compares offgridd against exactly the same llama.cpp revision it links.
#
# Usage: bench/build_llama_server.sh [VERSION]
#   VERSION defaults to the llama-cpp-python version installed in .venv.
# It is built for the same CPU target (offgridd/engine_build.py) as the engine installed in .venv, with the same
# GGML flags, so the comparison stays like for like.
# Environment:
#   PYTHON  python used for `pip download` / version lookup (default: .venv/bin/python)
#   JOBS    parallel compile jobs (default: 2)
#
# Prints the absolute path of the built binary on the last line of stdout.
# Idempotent: an existing binary for the same version is reused.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"
BUILD_ROOT="$HERE/.build"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
JOBS="${JOBS:-2}"

VERSION="${1:-}"
if [[ -z "$VERSION" ]]; then
    VERSION="$("$PYTHON" -c 'import importlib.metadata as m; print(m.version("llama_cpp_python"))')"
fi

TARGET="$(cd "$ROOT" && "$PYTHON" -c 'from offgridd import engine_build as e; r = e.installed(); print(r["target"] if r else e.pick().name)')"
read -r -a TARGET_FLAGS <<< "$(cd "$ROOT" && "$PYTHON" -m offgridd.engine_build cmake-args "$TARGET")"

SRC_DIR="$BUILD_ROOT/llama_cpp_python-$VERSION"
LLAMA_DIR="$SRC_DIR/vendor/llama.cpp"
CMAKE_BUILD_DIR="$BUILD_ROOT/llama-server-$VERSION-$TARGET"
BIN="$CMAKE_BUILD_DIR/bin/llama-server"

if [[ -x "$BIN" ]]; then
    echo "llama-server for llama-cpp-python $VERSION ($TARGET) already built" >&2
    echo "$BIN"
    exit 0
fi

mkdir -p "$BUILD_ROOT"
SDIST="$BUILD_ROOT/llama_cpp_python-$VERSION.tar.gz"
if [[ ! -f "$SDIST" ]]; then
    echo "downloading llama-cpp-python==$VERSION sdist" >&2
    "$PYTHON" -m pip download --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$BUILD_ROOT" >&2
fi
if [[ ! -f "$LLAMA_DIR/CMakeLists.txt" ]]; then
    echo "unpacking $SDIST" >&2
    tar -xzf "$SDIST" -C "$BUILD_ROOT"
fi

GENERATOR=()
if command -v ninja >/dev/null 2>&1; then
    GENERATOR=(-G Ninja)
fi

# Release, and the engine target's GGML flags (GGML_NATIVE=OFF, every instruction set named). The web UI is
# disabled and no prebuilt UI is fetched (offline machine); tests/examples are skipped. Static libs give a
# self-contained binary that cannot pick up the venv's libllama/libggml by accident.
echo "configuring llama.cpp in $CMAKE_BUILD_DIR for $TARGET: ${TARGET_FLAGS[*]}" >&2
cmake -S "$LLAMA_DIR" -B "$CMAKE_BUILD_DIR" "${GENERATOR[@]}" \
    -DCMAKE_BUILD_TYPE=Release \
    "${TARGET_FLAGS[@]}" \
    -DBUILD_SHARED_LIBS=OFF \
    -DLLAMA_BUILD_TOOLS=ON \
    -DLLAMA_BUILD_SERVER=ON \
    -DLLAMA_BUILD_TESTS=OFF \
    -DLLAMA_BUILD_EXAMPLES=OFF \
    -DLLAMA_BUILD_UI=OFF \
    -DLLAMA_USE_PREBUILT_UI=OFF >&2

echo "building target llama-server with -j$JOBS (slow on 2 cores)" >&2
cmake --build "$CMAKE_BUILD_DIR" --config Release --target llama-server -j "$JOBS" >&2

if [[ ! -x "$BIN" ]]; then
    echo "build finished but $BIN is missing" >&2
    exit 1
fi
echo "$BIN"
