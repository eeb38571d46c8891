#!/usr/bin/env bash
# The torch-free kernels and their C++ tests under AddressSanitizer + UndefinedBehaviorSanitizer
# (docs/reliability.md). RelWithDebInfo: the AVX2 N:M kernels need -O2 to fold their immediates.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p build
cmake -S . -B build/cmake-asan -DCMAKE_BUILD_TYPE=RelWithDebInfo -DSPARSE_EXT_SANITIZE=ON \
  > build/cmake-asan.log 2>&1 || { cat build/cmake-asan.log; exit 1; }
cmake --build build/cmake-asan -j"$(nproc)" > build/cmake-asan-build.log 2>&1 || { tail -50 build/cmake-asan-build.log; exit 1; }
ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1 \
  ctest --test-dir build/cmake-asan --output-on-failure
