#!/usr/bin/env bash
# Installs the llama.cpp runtime's binding, llama-cpp-python 0.3.36 (the `llama` extra), built from its sdist.
#   scripts/install-llama-binding.sh [PIP_ARGS...]     e.g. scripts/install-llama-binding.sh --no-cache-dir
# On an x86-64 CPU with AMX, this llama.cpp's AMX matmul crashed (SIGSEGV in ggml_backend_amx_mul_mat) on the first
# forward pass; there the build targets the CPU's own AVX/AVX-512 features, AMX off (LLAMA_AMX=1 keeps AMX).
# Elsewhere it builds as llama-cpp-python does by default (GGML_NATIVE). CMAKE_ARGS set by the caller come last.
set -euo pipefail
flags=""
if [[ "$(uname -m)" == x86_64 && "${LLAMA_AMX:-0}" != 1 ]] && grep -qw amx_tile /proc/cpuinfo; then
    has() { grep -qw "$1" /proc/cpuinfo; }
    flags="-DGGML_NATIVE=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"
    for pair in avx:GGML_AVX avx2:GGML_AVX2 fma:GGML_FMA f16c:GGML_F16C bmi2:GGML_BMI2 avx512f:GGML_AVX512 \
                avx512_vbmi:GGML_AVX512_VBMI avx512_vnni:GGML_AVX512_VNNI avx512_bf16:GGML_AVX512_BF16; do
        has "${pair%%:*}" && flags+=" -D${pair#*:}=ON"
    done
    echo "x86-64 with AMX: building without the AMX kernels ($flags)"
fi
CMAKE_ARGS="$flags -DLLAVA_BUILD=OFF ${CMAKE_ARGS:-}" pip install "llama-cpp-python==0.3.36" "$@"
python -c "import llama_cpp; print('llama-cpp-python', llama_cpp.__version__, 'installed')"
