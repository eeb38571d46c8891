# Cross-compile the torch-free kernels and C++ tests for aarch64 with Debian's
# g++-aarch64-linux-gnu and run them under qemu-user (scripts/test_aarch64.sh):
#   cmake -S . -B build/cmake-aarch64 -DCMAKE_TOOLCHAIN_FILE=cmake/aarch64-toolchain.cmake
set(CMAKE_SYSTEM_NAME Linux)
set(CMAKE_SYSTEM_PROCESSOR aarch64)
set(CMAKE_C_COMPILER aarch64-linux-gnu-gcc)
set(CMAKE_CXX_COMPILER aarch64-linux-gnu-g++)
set(CMAKE_FIND_ROOT_PATH /usr/aarch64-linux-gnu)
set(CMAKE_FIND_ROOT_PATH_MODE_PROGRAM NEVER)
set(CMAKE_FIND_ROOT_PATH_MODE_LIBRARY ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_INCLUDE ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_PACKAGE ONLY)
# ctest runs every test executable through this (qemu-aarch64-static works too).
find_program(SPARSE_EXT_QEMU_AARCH64 NAMES qemu-aarch64 qemu-aarch64-static REQUIRED)
# -cpu max: every extension qemu emulates, so the kernels behind optional features (FEAT_BF16)
# run too. A CPU without them (-DSPARSE_EXT_QEMU_CPU=cortex-a72) checks that the tests skip those
# entries, saying so, and run the baseline NEON ones.
set(SPARSE_EXT_QEMU_CPU max CACHE STRING "qemu-aarch64 -cpu model for the C++ tests")
set(CMAKE_CROSSCOMPILING_EMULATOR ${SPARSE_EXT_QEMU_AARCH64} -cpu ${SPARSE_EXT_QEMU_CPU}
    -L /usr/aarch64-linux-gnu)
