# WebAssembly SIMD128 build of the torch-free kernels and C++ tests with Emscripten, run under
# Node.js (scripts/test_wasm.sh):
#   cmake -S . -B build/cmake-wasm -DCMAKE_TOOLCHAIN_FILE=cmake/wasm-toolchain.cmake
# It wraps Emscripten's own toolchain file (found from EMSCRIPTEN, EMSCRIPTEN_ROOT_PATH or the
# Debian package's /usr/share/emscripten), which sets emcc/em++, the .js executable suffix and
# CMAKE_CROSSCOMPILING_EMULATOR = node, so ctest runs every test .js under node.
if(NOT EMSCRIPTEN_ROOT_PATH)
  if(DEFINED ENV{EMSCRIPTEN})
    set(EMSCRIPTEN_ROOT_PATH "$ENV{EMSCRIPTEN}")
  else()
    find_program(SPARSE_EXT_EMCC emcc REQUIRED)
    get_filename_component(_emcc "${SPARSE_EXT_EMCC}" REALPATH)
    get_filename_component(EMSCRIPTEN_ROOT_PATH "${_emcc}" DIRECTORY)
  endif()
endif()
if(NOT EXISTS "${EMSCRIPTEN_ROOT_PATH}/cmake/Modules/Platform/Emscripten.cmake")
  message(FATAL_ERROR "Emscripten's cmake/Modules/Platform/Emscripten.cmake not found under "
                      "'${EMSCRIPTEN_ROOT_PATH}': set EMSCRIPTEN to the emscripten directory")
endif()
include("${EMSCRIPTEN_ROOT_PATH}/cmake/Modules/Platform/Emscripten.cmake")

# SIMD128 for every file (defines __wasm_simd128__, which turns the wasmsimd tier on). No OpenMP:
# the kernels' `#pragma omp` lines are ignored (-Wno-unknown-pragmas in CMakeLists.txt).
set(CMAKE_CXX_FLAGS_INIT "-msimd128")
set(CMAKE_CXX_FLAGS_RELEASE_INIT "-O3 -DNDEBUG")
# WASM_ASYNC_COMPILATION=0: Emscripten 3.1.6's loader otherwise tries fetch() on a file path,
#   which Node >= 18 provides and which then fails ("Failed to parse URL").
# ALLOW_MEMORY_GROWTH: the tests' and the benchmark's buffers outgrow the 16 MiB default heap.
# NODERAWFS: files (the plan cache test's temporary directory) are the host's own.
# EXIT_RUNTIME: main's return value becomes node's exit status, which ctest reads.
set(CMAKE_EXE_LINKER_FLAGS_INIT
    "-sWASM_ASYNC_COMPILATION=0 -sALLOW_MEMORY_GROWTH=1 -sNODERAWFS=1 -sEXIT_RUNTIME=1")
