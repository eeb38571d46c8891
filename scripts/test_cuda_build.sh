#!/usr/bin/env bash
# Proves the CUDA sources compile on a machine without a GPU (CI runs this; a GPU is not needed):
#  1. every torch-free .cu file in csrc/cuda, standalone with nvcc, for sm_80 and sm_90a;
#  2. the whole extension (CPU kernels + CUDA kernels + CUDA glue) against a CUDA build of torch
#     kept in a cached venv outside the repo, then loaded to check that every sparse_ext op has a
#     CUDA kernel registered.
# Skips with a message only where nvcc is absent. SPARSE_EXT_CUDA_VENV moves the cached venv.
set -euo pipefail
cd "$(dirname "$0")/.."

NVCC=${NVCC:-$(command -v nvcc || true)}
if [ -z "$NVCC" ] && [ -x /usr/local/cuda/bin/nvcc ]; then NVCC=/usr/local/cuda/bin/nvcc; fi
if [ -z "$NVCC" ]; then
  echo "test_cuda_build: SKIPPED: nvcc not found, CUDA sources were not compiled"
  exit 0
fi

OUT=build/cuda-check
mkdir -p "$OUT/standalone"
ARCHS=(-gencode arch=compute_80,code=sm_80 -gencode arch=compute_90a,code=sm_90a)
echo "test_cuda_build: nvcc $("$NVCC" --version | tail -1)"
# One nvcc per file, $(nproc) at a time; a file is recompiled when it or any CUDA header changed.
compile_standalone() {
  local f=$1 obj="$OUT/standalone/$(echo "$1" | tr '/' '_').o"
  if [ ! -f "$obj" ] || [ "$f" -nt "$obj" ] || \
     [ -n "$(find csrc/cuda \( -name '*.cuh' -o -name '*.h' \) -newer "$obj")" ]; then
    "$NVCC" -std=c++17 -O3 --expt-relaxed-constexpr -Werror all-warnings -I csrc "${ARCHS[@]}" \
      -c "$f" -o "$obj" || { echo "FAILED standalone: $f"; return 1; }
  fi
  echo "  compiled standalone: $f"
}
export -f compile_standalone
export NVCC OUT
export ARCHS_STR="${ARCHS[*]}"
find csrc/cuda -name '*.cu' | sort | xargs -P "$(nproc)" -I{} bash -c \
  'ARCHS=($ARCHS_STR); compile_standalone "$@"' _ {}

VENV=${SPARSE_EXT_CUDA_VENV:-$HOME/.cache/sparse_ext/venv-cuda}
TORCH_CUDA_PIN=${SPARSE_EXT_CUDA_TORCH:-torch==2.14.1}
if ! "$VENV/bin/python" -c "import torch, sys; sys.exit(torch.version.cuda is None)" 2>/dev/null; then
  echo "test_cuda_build: creating $VENV with $TORCH_CUDA_PIN (a CUDA build of torch; one time)"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q "$TORCH_CUDA_PIN" ninja numpy setuptools
fi
"$VENV/bin/python" -c "import torch; print('test_cuda_build: torch', torch.__version__, 'CUDA', torch.version.cuda)"

# The CUDA build lands in build/cuda-check, never next to the in-place CPU build the tests import.
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-"8.0;9.0a"}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
if [ -z "${CUDA_HOME:-}" ]; then
  if [ -f /usr/local/cuda/include/cuda_runtime.h ]; then CUDA_HOME=/usr/local/cuda
  else CUDA_HOME=$(dirname "$(dirname "$(readlink -f "$NVCC")")"); fi
fi
export CUDA_HOME
"$VENV/bin/python" setup.py -q build_ext --build-temp "$OUT/temp" --build-lib "$OUT/lib" \
  > "$OUT/build.log" 2>&1 || { tail -60 "$OUT/build.log"; exit 1; }
grep -iE "warning" "$OUT/build.log" | grep -v "UserWarning\|There are no\|CUDA version" | head -20 || true

"$VENV/bin/python" - "$OUT/lib" <<'PY'
import glob, sys
import torch

lib = glob.glob(f"{sys.argv[1]}/sparse_ext/_C*.so")
assert lib, "no CUDA build of sparse_ext._C"
torch.ops.load_library(lib[0])
ops = sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("sparse_ext::"))
missing = [n for n in ops if not torch._C._dispatch_has_kernel_for_dispatch_key(n, "CUDA")]
print(f"test_cuda_build: {len(ops)} ops, {len(ops) - len(missing)} with a CUDA kernel")
if missing:
    sys.exit("ops without a CUDA kernel: " + ", ".join(missing))
PY
