#!/usr/bin/env bash
# WebAssembly SIMD128: builds the torch-free kernels and their C++ tests with Emscripten
# (cmake/wasm-toolchain.cmake, -msimd128) and runs ctest under Node.js, so every wasmsimd ukernel in
# the registries is compared against the scalar reference. Installs Debian's emscripten package
# (which brings node) with apt-get when missing; without apt (or without root) it prints why and
# exits 0.
#   scripts/test_wasm.sh            # build/cmake-wasm
#   SANITIZE=1 scripts/test_wasm.sh # ASan + UBSan build (Emscripten's), build/cmake-wasm-asan:
#                                   # ~2 min to build, ~1 min to test; not part of CI
set -euo pipefail
cd "$(dirname "$0")/.."

have_tools() { command -v emcc >/dev/null 2>&1 && command -v node >/dev/null 2>&1; }

if ! have_tools; then
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "test_wasm: SKIPPED (no apt-get to install emscripten and nodejs)"
    exit 0
  fi
  SUDO=""
  if [ "$(id -u)" != 0 ]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then SUDO="sudo -n"; else
      echo "test_wasm: SKIPPED (not root and no passwordless sudo to apt-get install emscripten)"
      exit 0
    fi
  fi
  echo "test_wasm: installing emscripten"
  mkdir -p build
  if ! { $SUDO apt-get update -qq &&
         DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
           emscripten nodejs; } > build/apt-wasm.log 2>&1; then
    tail -20 build/apt-wasm.log
    echo "test_wasm: SKIPPED (apt-get install failed; log in build/apt-wasm.log)"
    exit 0
  fi
  have_tools || { echo "test_wasm: FAILED (packages installed but emcc or node not found)"; exit 1; }
fi

# emcc runs node scripts that need the acorn parser; Debian ships it as node-acorn under
# /usr/share/nodejs, which a node not built by Debian does not search.
if ! node -e "require('acorn')" >/dev/null 2>&1 && [ -d /usr/share/nodejs/acorn ]; then
  export NODE_PATH="/usr/share/nodejs${NODE_PATH:+:$NODE_PATH}"
fi

build=build/cmake-wasm
config=(-DCMAKE_BUILD_TYPE=Release)
if [ "${SANITIZE:-0}" != 0 ]; then
  build=build/cmake-wasm-asan
  config=(-DCMAKE_BUILD_TYPE=RelWithDebInfo -DSPARSE_EXT_SANITIZE=ON)
fi
mkdir -p build
# Debian's package ships a prebuilt, frozen system-library cache (/usr/share/emscripten/cache),
# so nothing is compiled on first use (the first emcc run here took 3 s); an emsdk install
# instead builds missing libraries into its cache (EM_CACHE) the first time they are needed.
cmake -S . -B "$build" "${config[@]}" \
  -DCMAKE_TOOLCHAIN_FILE="$PWD/cmake/wasm-toolchain.cmake" > build/cmake-wasm.log 2>&1 ||
  { cat build/cmake-wasm.log; exit 1; }
cmake --build "$build" -j"${JOBS:-2}" > build/cmake-wasm-build.log 2>&1 ||
  { tail -50 build/cmake-wasm-build.log; exit 1; }
# -V shows each test's list of checked ukernels; the tests themselves fail when a SIMD128 build
# checked no wasmsimd ukernel (expect_covered).
rc=0
ctest --test-dir "$build" --output-on-failure -V > build/ctest-wasm.log 2>&1 || rc=$?
grep -E "all passed|failure|expectation failed|skipped|tests passed|Total Test time" \
  build/ctest-wasm.log || true
checked=$(grep -oE "wasmsimd:[a-z0-9x-]+" build/ctest-wasm.log | sed 's/^wasmsimd://' | sort -u || true)
count=$(printf '%s' "$checked" | grep -c . || true)
echo "test_wasm: $count wasmsimd ukernels checked against the scalar reference:"
printf '%s\n' "$checked" | paste -sd' ' | fold -s -w 100 | sed 's/^/  /'
if [ "$count" = 0 ]; then
  echo "test_wasm: FAILED (no wasmsimd ukernel was checked)"
  rc=1
fi
if [ "$rc" != 0 ]; then
  tail -60 build/ctest-wasm.log
  echo "test_wasm: FAILED (full log in build/ctest-wasm.log)"
fi
exit "$rc"
