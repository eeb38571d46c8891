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
# The environment's setup (pip, the build) goes to a log: the console shows the report.
mkdir -p bench/results
log=bench/results/setup_env.log
echo "setting up the environment (log: $log)"
bash scripts/setup_env.sh > "$log" 2>&1 || { tail -30 "$log"; echo "setup failed (full log: $log)"; exit 1; }
.venv/bin/python -m bench.run "$@"
