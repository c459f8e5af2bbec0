#!/usr/bin/env bash
# Set up (scripts/setup_env.sh) and run the test suite. Extra arguments go to pytest.
# On a machine without a CUDA GPU the Triton kernels run in the interpreter (TRITON_INTERPRET=1).
#   scripts/test.sh --fast    the inner loop: skips the tests marked `slow` (-m "not slow"); CI runs them all
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
. "${VENV:-.venv}/bin/activate"
# the extension was built above: a test run without it is a broken install, not a pass
if [ "${GRADREG_SKIP_EXT:-0}" != "1" ]; then export GRADREG_REQUIRE_EXT=${GRADREG_REQUIRE_EXT:-1}; fi
# `pytest` (not `python -m pytest`) so the installed package, with its built extension, is tested.
args=()
for a in "$@"; do
  if [ "$a" = "--fast" ]; then args+=(-m "not slow"); else args+=("$a"); fi
done
exec pytest tests -q -ra "${args[@]}"
