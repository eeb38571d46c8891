#!/usr/bin/env bash
# The main job: the default benchmark suite (table, JSON and plots under bench/results/).
# Extra args go to the suite; see `scripts/bench.sh --help`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
.venv/bin/python -m bench.run "$@"
