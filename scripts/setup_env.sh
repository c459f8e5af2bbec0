#!/usr/bin/env bash
# Set up a virtual environment with everything gradreg_fast needs and install the package into it,
# building the extension gradreg_fast._C against the installed torch. Idempotent.
#
#   VENV=.venv (default)       where the environment lives
#   TORCH_SPEC=torch==2.13.0   which torch (CPU build here; set e.g. torch==2.14.1 for CUDA)
#   GRADREG_CUDA=auto|1|0      see setup.py
#   EDITABLE=1                 pip install -e (develop in place) instead of a regular install
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
PYTHON=${PYTHON:-python3}

if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
. "$VENV/bin/activate"
pip install -q --upgrade pip >/dev/null 2>&1 || true
# torch first (the build needs it), then triton for the Triton kernels (interpreted on CPU-only machines)
pip install -q "$TORCH_SPEC"
pip install -q "triton>=3.6,<3.10" numpy ninja pybind11 setuptools wheel \
  pytest hypothesis tqdm matplotlib mlxtend
# PyTorch Lightning for examples/lightning_digits.py and its test (the optional extra .[lightning]);
# installed with the torch spec on the same line so that the resolver keeps the torch chosen above
pip install -q "lightning>=2.1,<3" "$TORCH_SPEC"
# the third-party zoo (the optional extra .[models]): transformers with any torch; torchvision and timm only
# where the index has a torchvision for this torch (its wheels pair with the index's CUDA torch builds;
# a CPU-only torch has none, and tests/models/test_third_party.py skips them there unless GRADREG_REQUIRE_MODELS=1)
pip install -q transformers "$TORCH_SPEC"
if [ "${MODELS_VISION:-0}" = "1" ]; then
  pip install -q timm "torchvision${TORCHVISION_SPEC:-}" "$TORCH_SPEC"
fi
if [ "${EDITABLE:-0}" = "1" ]; then
  pip install -q --no-build-isolation --no-deps -e .
else
  pip install -q --no-build-isolation --no-deps .
fi
# Triton <= 3.6's CPU interpreter (how the tests run the Triton kernels without a GPU) fails with
# NumPy >= 2.4; torch 2.11 pins triton 3.6. The package knows the rule
# (gradreg_fast._backend.interpreter_incompatibility): where it applies, keep NumPy below 2.4.
if (cd / && python -c "import sys; from gradreg_fast._backend import interpreter_incompatibility as f; sys.exit(0 if f() else 1)" 2>/dev/null); then
  pip install -q "numpy<2.4"
fi
# report from outside the source tree, so that the installed package (with its extension) is imported
(cd / && python - <<'PY'
import torch, gradreg_fast
print(f"gradreg_fast {gradreg_fast.__version__} from {gradreg_fast.__file__}")
print(f"torch {torch.__version__}")
for name, s in gradreg_fast.backends().items():
    print(f"  backend {name:9s} {'yes' if s.available else 'no ':3s}  {s.reason}")
PY
)
