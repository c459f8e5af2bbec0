#!/usr/bin/env bash
# Set up (scripts/setup_env.sh) and run the main job: the penalty step benchmark on this machine's
# default device. Extra arguments go to benchmarks/bench_step.py (e.g. --quick, --device cuda).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
. "${VENV:-.venv}/bin/activate"
# measure the installed package with its compiled kernels, never a silent pure-Python fallback
if [ "${GRADREG_SKIP_EXT:-0}" != "1" ]; then export GRADREG_REQUIRE_EXT=${GRADREG_REQUIRE_EXT:-1}; fi
exec python benchmarks/bench_step.py "$@"
