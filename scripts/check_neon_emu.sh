#!/usr/bin/env bash
# Superseded by scripts/test_aarch64.sh (real cross compiler + qemu, every NEON family); kept as a
# quick check that needs no packages.
# Logic check of the aarch64-only NEON conv ukernels on an x86 host (no aarch64 machine or cross
# compiler was available when they were written): compiles
# csrc/kernels/conv/conv-neon.cpp against a tiny emulation of the NEON intrinsics it uses
# (csrc/tests/neon_emu/arm_neon_shim.h) and runs csrc/tests/test_conv.cpp over the scalar and the
# emulated NEON registry entries. Real aarch64 builds compile the same file with <arm_neon.h>.
set -euo pipefail
cd "$(dirname "$0")/.."
out=build/neon_emu
mkdir -p "$out"
sed -e 's/#if defined(__aarch64__)/#if 1/' -e 's|#include <arm_neon.h>|#include "arm_neon_shim.h"|' \
    -e 's|#include "conv.h"|#include "kernels/conv/conv.h"|' csrc/kernels/conv/conv-neon.cpp > "$out/conv-neon-emu.cpp"
# The registry must not hand out AVX2 entries here (the AVX2 table stays compiled, unused).
sed -e 's|#include "conv.h"|#include "kernels/conv/conv.h"|' \
    -e 's|  switch (isa) {|  if (isa == Isa::kAvx2) return nullptr;\n  switch (isa) {|' csrc/kernels/conv/conv.cpp > "$out/conv-emu.cpp"
sed -e 's/if (!isa_supported(e.isa)) continue;/if (e.isa == Isa::kAvx2) continue;/' csrc/tests/test_conv.cpp > "$out/test_conv_emu.cpp"
${CXX:-g++} -std=c++17 -O2 -Wall -Wno-unknown-pragmas -Icsrc -Icsrc/tests -Icsrc/tests/neon_emu \
  "$out/test_conv_emu.cpp" "$out/conv-emu.cpp" "$out/conv-neon-emu.cpp" csrc/kernels/conv/conv-scalar.cpp \
  csrc/kernels/conv/conv-avx2.cpp csrc/kernels/spmm/*.cpp csrc/kernels/common/isa.cpp -o "$out/test_conv_neon_emu"
"$out/test_conv_neon_emu"
