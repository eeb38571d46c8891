#!/usr/bin/env bash
# Sparse 1x1 conv and SpMM against a dense SIMD128 GEMM at MobileNet v1 1x1 shapes, as WebAssembly
# under Node.js (csrc/bench/bench_portable.cpp, one thread). Builds with the same Emscripten setup
# as scripts/test_wasm.sh (run that once first if emscripten is missing).
#   scripts/bench_wasm.sh                      # build/cmake-wasm, all shapes, block rows 1
#   scripts/bench_wasm.sh --block-rows 4       # args go to bench_portable
#   NATIVE=1 scripts/bench_wasm.sh             # the same program natively (build/cmake)
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "${NATIVE:-0}" != 0 ]; then
  cmake -S . -B build/cmake -DCMAKE_BUILD_TYPE=Release > build/cmake.log 2>&1 ||
    { cat build/cmake.log; exit 1; }
  cmake --build build/cmake --target bench_portable -j"${JOBS:-2}" > build/bench-native.log 2>&1 ||
    { tail -50 build/bench-native.log; exit 1; }
  echo "native $(uname -m), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //')"
  exec build/cmake/bench_portable "$@"
fi

command -v emcc >/dev/null 2>&1 && command -v node >/dev/null 2>&1 ||
  { echo "bench_wasm: emcc and node are needed (scripts/test_wasm.sh installs them)"; exit 1; }
if ! node -e "require('acorn')" >/dev/null 2>&1 && [ -d /usr/share/nodejs/acorn ]; then
  export NODE_PATH="/usr/share/nodejs${NODE_PATH:+:$NODE_PATH}"
fi
build=build/cmake-wasm
mkdir -p build
cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=Release \
  -DCMAKE_TOOLCHAIN_FILE="$PWD/cmake/wasm-toolchain.cmake" > build/cmake-wasm.log 2>&1 ||
  { cat build/cmake-wasm.log; exit 1; }
cmake --build "$build" --target bench_portable -j"${JOBS:-2}" > build/bench-wasm-build.log 2>&1 ||
  { tail -50 build/bench-wasm-build.log; exit 1; }
echo "node $(node --version) (V8 $(node -p process.versions.v8)) on $(uname -m)," \
     "$(grep -m1 'model name' /proc/cpuinfo 2>/dev/null | cut -d: -f2- | sed 's/^ //')"
# --no-liftoff: every function compiled by TurboFan up front. V8 otherwise starts wasm in its
# baseline compiler and tiers up per call (no on-stack replacement), so functions called only a
# few times, like a whole-layer GEMM, were timed in baseline code: measured 4-5x slower here.
exec node --no-liftoff "$build/bench_portable.js" "$@"
