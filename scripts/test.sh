#!/usr/bin/env bash
# Every test: C++ kernel tests (ctest) and the Python suite. Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
bash scripts/test_sanitize.sh   # ASan + UBSan build of the kernels and C++ tests
cmake -S . -B build/cmake -DCMAKE_BUILD_TYPE=Release > build/cmake.log 2>&1 || { cat build/cmake.log; exit 1; }
cmake --build build/cmake -j"$(nproc)" > build/cmake-build.log 2>&1 || { tail -50 build/cmake-build.log; exit 1; }
ctest --test-dir build/cmake --output-on-failure
# The same C++ tests cross-compiled for aarch64 and run under qemu (NEON ukernels vs scalar).
bash scripts/test_aarch64.sh
# The same C++ tests built for WebAssembly SIMD128 with Emscripten and run under node.
bash scripts/test_wasm.sh
# The CUDA sources compiled with nvcc (standalone, sm_80 + sm_90a) and the whole extension built
# against a CUDA build of torch in a cached venv; every op must have a CUDA kernel. No GPU needed.
bash scripts/test_cuda_build.sh
.venv/bin/python -m pytest -q python_tests "$@"
