#!/usr/bin/env bash
# The one prepared GPU run (docs/cuda.md, "Checking on a GPU"): builds sparse_ext against the
# machine's torch, logs the environment, runs the CUDA tests and the CUDA benchmark suite, and
# writes everything to OUTDIR. GPU time is scarce, so:
#   - every stage runs even when an earlier one failed, and its status is recorded;
#   - the whole script fits in TOTAL_BUDGET_S (default 470 s, about 8 minutes): each stage gets a
#     cap from what is left, and the benchmark suite shares out the rest (bench/run.py --device cuda);
#   - OUTDIR receives 7 files at most (env.txt, build.log, tests.log, bench.log, bench_cuda.json,
#     bench_cuda.md, summary.md), so it fits remote runners that return only a few files.
#
#   bash bench/gpu_check.sh OUTDIR
#
# Environment: PYTHON (default python3: the interpreter that has the CUDA torch; the repo's .venv is
# the CPU one), TORCH_CUDA_ARCH_LIST (default 9.0a, the H200; "8.0;9.0a" for both),
# TOTAL_BUDGET_S, BENCH_SIZE (quick | default | full; default: default), BENCH_ARGS (extra
# bench.run flags, e.g. "--flush-l2"), TEST_ARGS (extra pytest flags), SKIP_BUILD=1 (reuse an
# in-place build), SKIP_TESTS=1, SKIP_BENCH=1.
set -u
set -o pipefail

if [ $# -lt 1 ]; then
  echo "usage: bash bench/gpu_check.sh OUTDIR" >&2
  exit 2
fi
mkdir -p "$1" || exit 2
OUTDIR=$(cd "$1" && pwd)
cd "$(dirname "$0")/.." || exit 2
ROOT=$(pwd)
PY=${PYTHON:-python3}
TOTAL=${TOTAL_BUDGET_S:-470}
SIZE=${BENCH_SIZE:-default}
START=$(date +%s)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
export PYTHONUNBUFFERED=1
export PYTHONDONTWRITEBYTECODE=1

elapsed() { echo $(( $(date +%s) - START )); }
left() { echo $(( TOTAL - $(date +%s) + START )); }
min() { if [ "$1" -lt "$2" ]; then echo "$1"; else echo "$2"; fi; }
max() { if [ "$1" -gt "$2" ]; then echo "$1"; else echo "$2"; fi; }

SUMMARY_ROWS=()
record() {  # stage, exit code, seconds, note
  local verdict="ok"
  [ "$2" -ne 0 ] && verdict="FAILED (exit $2)"
  [ "$2" -eq 124 ] && verdict="TIMED OUT (cap reached)"
  SUMMARY_ROWS+=("| $1 | $verdict | $3 s | $4 |")
  echo "[gpu_check $(elapsed)s] $1: $verdict ($3 s) $4"
}
note_of() { tail -n "${2:-1}" "$1" 2>/dev/null | tr '\n|' ' /' | cut -c1-200; }

echo "[gpu_check] repo $ROOT -> $OUTDIR; budget ${TOTAL}s; python $(command -v "$PY")"

# ---- 1. environment ------------------------------------------------------------------------------
t0=$(date +%s)
{
  echo "# date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
  echo "# host: $(uname -a)"
  echo "# cores: $(nproc); memory: $(free -g 2>/dev/null | awk '/Mem:/ {print $2 " GiB"}')"
  if [ -d .git ] || [ -f .git ]; then echo "# commit: $(git rev-parse HEAD 2>/dev/null) $(git status --short 2>/dev/null | wc -l) changed files"; fi
  echo; echo "## nvidia-smi"
  timeout 30 nvidia-smi 2>&1 || echo "nvidia-smi failed or missing"
  timeout 30 nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem,power.limit --format=csv 2>&1
  echo; echo "## nvcc"
  (command -v nvcc && nvcc --version) 2>&1 || echo "nvcc not on PATH"
  echo; echo "## python / torch"
  timeout 60 "$PY" - <<'PY' 2>&1
import importlib, platform, sys
print("python", platform.python_version(), sys.executable)
import torch
print("torch", torch.__version__, "CUDA", torch.version.cuda, "cuDNN", torch.backends.cudnn.version())
print("cuda available", torch.cuda.is_available(), "devices", torch.cuda.device_count())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", p.name, f"sm_{p.major}{p.minor}", p.multi_processor_count, "SMs",
          round(p.total_memory / 2**30, 1), "GiB", "L2", getattr(p, "L2_cache_size", "?"))
print("arch list in torch:", torch.cuda.get_arch_list() if torch.cuda.is_available() else None)
for name in ("pytest", "xdist", "pytest_timeout", "transformers", "numpy", "ninja", "setuptools",
             "nvidia.cusparselt"):
    try:
        mod = importlib.import_module(name)
        print(f"{name}: {getattr(mod, '__version__', 'present')}")
    except Exception as exc:  # noqa: BLE001
        print(f"{name}: MISSING ({type(exc).__name__})")
try:
    print("cuSPARSELt via torch:", torch.backends.cusparselt.is_available(),
          torch.backends.cusparselt.version())
except Exception as exc:  # noqa: BLE001
    print("cuSPARSELt via torch: unknown", exc)
PY
} > "$OUTDIR/env.txt" 2>&1
record env 0 $(( $(date +%s) - t0 )) "$(grep -m1 '^device' "$OUTDIR/env.txt" | cut -c1-80)"

# ---- 2. build --------------------------------------------------------------------------------------
t0=$(date +%s)
if [ "${SKIP_BUILD:-0}" = "1" ]; then
  echo "SKIP_BUILD=1: using the existing in-place build" > "$OUTDIR/build.log"
  rc=0
else
  export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0a}
  export MAX_JOBS=${MAX_JOBS:-$(nproc)}
  if [ -z "${CUDA_HOME:-}" ]; then
    if [ -f /usr/local/cuda/include/cuda_runtime.h ]; then export CUDA_HOME=/usr/local/cuda
    elif command -v nvcc >/dev/null; then CUDA_HOME=$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")"); export CUDA_HOME
    fi
  fi
  # A library left from another build (say the CPU one) must not be tested by mistake.
  rm -f sparse_ext/_C*.so
  cap=$(max 60 "$(min 330 $(( $(left) - 200 )))")
  echo "[gpu_check $(elapsed)s] build: TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST MAX_JOBS=$MAX_JOBS CUDA_HOME=${CUDA_HOME:-?} cap ${cap}s"
  timeout -k 10 "$cap" "$PY" setup.py build_ext --inplace > "$OUTDIR/build.log" 2>&1
  rc=$?
fi
# Which ops have a CUDA kernel (the build must have every one).
timeout 60 "$PY" - >> "$OUTDIR/build.log" 2>&1 <<'PY'
import sys
import torch
import sparse_ext  # noqa: F401
ops = sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("sparse_ext::"))
missing = [n for n in ops if not torch._C._dispatch_has_kernel_for_dispatch_key(n, "CUDA")]
print(f"ops: {len(ops)}, with a CUDA kernel: {len(ops) - len(missing)}")
if missing:
    print("ops WITHOUT a CUDA kernel: " + ", ".join(missing))
    sys.exit(3)
PY
ops_rc=$?
[ "$rc" -eq 0 ] && rc=$ops_rc
warnings=$(grep -iE "warning" "$OUTDIR/build.log" | grep -vcE "UserWarning|There are no|CUDA version" || true)
note="$(note_of "$OUTDIR/build.log" 1); $warnings warning lines"
if [ "$rc" -eq 124 ]; then
  note="not finished within the cap; a rerun continues it (ninja keeps the objects in build/)"
elif [ "$rc" -ne 0 ] && [ "$rc" -ne 3 ]; then   # the compiler's first error, not the import's
  note="$(grep -m1 -E 'error|Error' "$OUTDIR/build.log" | tr '|' '/' | cut -c1-200)"
fi
record build "$rc" $(( $(date +%s) - t0 )) "$note"

# ---- 3. CUDA tests ---------------------------------------------------------------------------------
t0=$(date +%s)
: > "$OUTDIR/tests.log"
# Smoke first (seconds): every family on the GPU against the CPU ops; the only check without pytest.
echo "== smoke: python -m bench.run --device cuda --smoke" >> "$OUTDIR/tests.log"
timeout -k 10 120 "$PY" -m bench.run --device cuda --smoke >> "$OUTDIR/tests.log" 2>&1
rc=$?
note=$(grep -E '^smoke: ' "$OUTDIR/tests.log" | tail -1)
[ -z "$note" ] && note=$(note_of "$OUTDIR/tests.log" 1)   # it did not get far (an import error)
record smoke "$rc" $(( $(date +%s) - t0 )) "$note"

t0=$(date +%s)
if [ "${SKIP_TESTS:-0}" = "1" ]; then
  record pytest 0 0 "skipped (SKIP_TESTS=1)"
elif ! "$PY" -c "import pytest" 2>/dev/null; then
  echo "pytest is not installed for $PY: only the smoke test above ran" >> "$OUTDIR/tests.log"
  record pytest 1 0 "pytest MISSING: only the smoke test ran"
else
  # The device-parametrized CUDA cases and docs/cuda.md's GPU blocks; test_bench_cuda.py is the
  # CPU-side check of this very script and the suite (it runs in CI), so it is left out here.
  args=(-q -rfE -k "cuda and not test_bench_cuda" -p no:cacheprovider --durations=10)
  "$PY" -c "import pytest_timeout" 2>/dev/null && args+=(--timeout=120)
  "$PY" -c "import xdist" 2>/dev/null && args+=(-n "$(min 8 "$(nproc)")")
  # The benchmark needs ~150 s after the tests; the tests get up to 150 s of what is left.
  cap=$(max 45 "$(min 150 $(( $(left) - 170 )))")
  echo "== pytest ${args[*]} python_tests ${TEST_ARGS:-} (cap ${cap}s)" >> "$OUTDIR/tests.log"
  # shellcheck disable=SC2086
  timeout -k 10 "$cap" "$PY" -m pytest "${args[@]}" python_tests ${TEST_ARGS:-} >> "$OUTDIR/tests.log" 2>&1
  rc=$?
  # pytest: 5 = nothing collected (no CUDA-parametrized test matched)
  record pytest "$rc" $(( $(date +%s) - t0 )) "$(grep -E '(passed|failed|error|skipped|no tests ran)' "$OUTDIR/tests.log" | tail -1 | cut -c1-160)"
fi

# ---- 4. CUDA benchmark suite -------------------------------------------------------------------------
t0=$(date +%s)
if [ "${SKIP_BENCH:-0}" = "1" ]; then
  echo "SKIP_BENCH=1" > "$OUTDIR/bench.log"
  record bench 0 0 "skipped (SKIP_BENCH=1)"
else
  # The suite stops starting cases at its budget; one case (and a family's grace) may run past it.
  budget=$(max 60 $(( $(left) - 75 )))
  echo "[gpu_check $(elapsed)s] bench: size $SIZE, budget ${budget}s"
  # shellcheck disable=SC2086
  timeout -k 10 $(( budget + 60 )) "$PY" -m bench.run --device cuda --size "$SIZE" \
    --budget-s "$budget" --json "$OUTDIR/bench_cuda.json" --markdown "$OUTDIR/bench_cuda.md" \
    --workdir "$WORK" --no-progress ${BENCH_ARGS:-} > "$OUTDIR/bench.log" 2>&1
  rc=$?
  record bench "$rc" $(( $(date +%s) - t0 )) "$(grep -cE '^\[[0-9]+/[0-9]+\]' "$OUTDIR/bench.log") cases logged, $(grep -cE 'ERROR' "$OUTDIR/bench.log") errors"
fi
rm -rf "$WORK"

# ---- 5. summary ----------------------------------------------------------------------------------------
{
  echo "# GPU check $(date -u '+%Y-%m-%d %H:%M UTC')"
  echo
  grep -m1 '^device' "$OUTDIR/env.txt"
  grep -m1 '^torch' "$OUTDIR/env.txt"
  echo
  echo "| stage | status | time | note |"
  echo "|---|---|---|---|"
  printf '%s\n' "${SUMMARY_ROWS[@]}"
  echo
  echo "Total: $(elapsed) s of a ${TOTAL} s budget."
  echo
  echo "## Smoke"
  echo
  grep -E '^smoke (FAIL|PASS)' "$OUTDIR/tests.log" | grep -c PASS | sed 's/$/ checks passed/'
  grep -E '^smoke FAIL' "$OUTDIR/tests.log" | head -20 | sed 's/^/- /'
  echo
  echo "## Failed tests (first 30)"
  echo
  grep -E '^(FAILED|ERROR) ' "$OUTDIR/tests.log" | head -30 | cut -c1-250 | sed 's/^/- /'
  echo
  echo "## Benchmark targets"
  echo
  if [ -f "$OUTDIR/bench_cuda.md" ]; then
    sed -n '/^#### Targets/,/^#### /p' "$OUTDIR/bench_cuda.md" | grep '^- '
  else
    echo "no benchmark report (see bench.log)"
    tail -5 "$OUTDIR/bench.log" 2>/dev/null
  fi
} > "$OUTDIR/summary.md" 2>&1
echo
cat "$OUTDIR/summary.md"
exit 0
