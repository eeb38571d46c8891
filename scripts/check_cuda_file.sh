#!/usr/bin/env bash
# Quick compile check of single CUDA-side files while developing (the full check is
# scripts/test_cuda_build.sh): a .cu is compiled standalone with nvcc for sm_80 and sm_90a; a .cpp
# (CUDA glue) is syntax-checked against the CUDA build of torch in the cached venv.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${SPARSE_EXT_CUDA_VENV:-$HOME/.cache/sparse_ext/venv-cuda}
PY="$VENV/bin/python"
for f in "$@"; do
  case "$f" in
    *.cu)
      nvcc -std=c++17 -O3 --expt-relaxed-constexpr -Werror all-warnings -I csrc \
        -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90a,code=sm_90a \
        -c "$f" -o /dev/null ;;
    *.cpp)
      mapfile -t INC < <("$PY" - <<'PY'
import glob, os
import nvidia
from torch.utils.cpp_extension import include_paths
for p in include_paths(device_type="cuda"):
    if not p.startswith("/usr/local"):
        print("-I" + p)
for root in nvidia.__path__:
    for p in sorted(glob.glob(os.path.join(root, "*", "include"))):
        print("-idirafter" + p)
PY
)
      g++ -std=c++20 -fsyntax-only -Wall -Wno-unknown-pragmas -DSPARSE_EXT_WITH_CUDA=1 \
        -I csrc -I/usr/local/cuda/include "${INC[@]}" "$f" ;;
    *) echo "check_cuda_file: $f is neither .cu nor .cpp" >&2; exit 2 ;;
  esac
  echo "ok: $f"
done
