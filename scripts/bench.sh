#!/usr/bin/env bash
# Set up (scripts/setup_env.sh) and run the main job: the penalty step benchmark on this machine's
# default device. Extra arguments go to benchmarks/bench_step.py (e.g. --quick, --device cuda).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
. "${VENV:-.venv}/bin/activate"
exec python benchmarks/bench_step.py "$@"
