#!/usr/bin/env bash
# The main job: the default benchmark suite (table, JSON and plots under bench/results/).
# Extra args go to the suite; see `scripts/bench.sh --help`.
set -euo pipefail
cd "$(dirname "$0")/.."
# --help needs neither the environment nor the build: answer it before setting them up.
for arg in "$@"; do
  case "$arg" in
    -h|--help) exec "${PYTHON:-python3}" -m bench.run --help ;;
  esac
done
bash scripts/setup_env.sh
.venv/bin/python -m bench.run "$@"
