#!/usr/bin/env bash
# Every test: C++ kernel tests (ctest) and the Python suite. Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
cmake -S . -B build/cmake -DCMAKE_BUILD_TYPE=Release > build/cmake.log 2>&1 || { cat build/cmake.log; exit 1; }
cmake --build build/cmake -j"$(nproc)" > build/cmake-build.log 2>&1 || { tail -50 build/cmake-build.log; exit 1; }
ctest --test-dir build/cmake --output-on-failure
# The same kernels and C++ tests under AddressSanitizer + UndefinedBehaviorSanitizer (issue 7,
# docs/reliability.md). RelWithDebInfo: the AVX2 N:M kernels need -O2 to fold their immediates.
cmake -S . -B build/cmake-asan -DCMAKE_BUILD_TYPE=RelWithDebInfo -DSPARSE_EXT_SANITIZE=ON \
  > build/cmake-asan.log 2>&1 || { cat build/cmake-asan.log; exit 1; }
cmake --build build/cmake-asan -j"$(nproc)" > build/cmake-asan-build.log 2>&1 || { tail -50 build/cmake-asan-build.log; exit 1; }
ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1 \
  ctest --test-dir build/cmake-asan --output-on-failure
.venv/bin/python -m pytest -q python_tests "$@"
