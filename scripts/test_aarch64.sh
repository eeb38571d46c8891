#!/usr/bin/env bash
# ARM NEON under emulation: cross-compiles the torch-free kernels and their C++ tests for aarch64
# (Debian's g++-aarch64-linux-gnu) and runs ctest under qemu-user, so every NEON ukernel in the
# registries is compared against the scalar reference. Installs both packages with apt-get when
# they are missing; without apt (or without root) it prints why and exits 0.
#   scripts/test_aarch64.sh            # build/cmake-aarch64
#   SPARSE_EXT_TEST_SMALL=1 scripts/test_aarch64.sh   # skip the largest C++ test shapes
set -euo pipefail
cd "$(dirname "$0")/.."

have_tools() {
  command -v aarch64-linux-gnu-g++ >/dev/null 2>&1 &&
    { command -v qemu-aarch64 >/dev/null 2>&1 || command -v qemu-aarch64-static >/dev/null 2>&1; }
}

if ! have_tools; then
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "test_aarch64: SKIPPED (no apt-get to install g++-aarch64-linux-gnu and qemu-user)"
    exit 0
  fi
  SUDO=""
  if [ "$(id -u)" != 0 ]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then SUDO="sudo -n"; else
      echo "test_aarch64: SKIPPED (not root and no passwordless sudo to apt-get install" \
           "g++-aarch64-linux-gnu qemu-user)"
      exit 0
    fi
  fi
  echo "test_aarch64: installing g++-aarch64-linux-gnu qemu-user"
  mkdir -p build
  if ! { $SUDO apt-get update -qq &&
         DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
           g++-aarch64-linux-gnu qemu-user; } > build/apt-aarch64.log 2>&1; then
    tail -20 build/apt-aarch64.log
    echo "test_aarch64: SKIPPED (apt-get install failed; log in build/apt-aarch64.log)"
    exit 0
  fi
  have_tools || { echo "test_aarch64: FAILED (packages installed but tools not found)"; exit 1; }
fi

build=build/cmake-aarch64
mkdir -p build
cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=Release \
  -DCMAKE_TOOLCHAIN_FILE="$PWD/cmake/aarch64-toolchain.cmake" > build/cmake-aarch64.log 2>&1 ||
  { cat build/cmake-aarch64.log; exit 1; }
cmake --build "$build" -j"${JOBS:-2}" > build/cmake-aarch64-build.log 2>&1 ||
  { tail -50 build/cmake-aarch64-build.log; exit 1; }
# Full test sizes take ~10 s under qemu here; SPARSE_EXT_TEST_SMALL=1 trims them on slow hosts.
# -V shows each test's list of checked ukernels (neon:... entries must appear: the tests fail
# when an aarch64 build with NEON kernels checked none).
rc=0
SPARSE_EXT_TEST_SMALL="${SPARSE_EXT_TEST_SMALL:-0}" OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}" \
  ctest --test-dir "$build" --output-on-failure -V > build/ctest-aarch64.log 2>&1 || rc=$?
grep -E "ukernels checked|all passed|failure|expectation failed|tests passed|Total Test time" \
  build/ctest-aarch64.log || true
if [ "$rc" != 0 ]; then
  tail -60 build/ctest-aarch64.log
  echo "test_aarch64: FAILED (full log in build/ctest-aarch64.log)"
fi
exit "$rc"
