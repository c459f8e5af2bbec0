#!/usr/bin/env bash
# Build the extension WITH its CUDA kernels against a CUDA build of torch (no GPU needed) and check that
# every op with a CPU kernel also has a CUDA kernel registered. Used by CI: a CUDA source that does not
# compile must never land. The build runs with GRADREG_PTXAS_VERBOSE=1 (setup.py: nvcc -Xptxas=-v): every
# kernel's registers, stack, spills and shared memory are summarized from the build log, and written as
# a markdown table to CUDA_RESOURCE_REPORT when that is set (CUDA_BUILD_LOG=path keeps the build log), e.g.
#   TORCH_CUDA_ARCH_LIST="8.0;9.0" CUDA_RESOURCE_REPORT=benchmarks/results/gpu_resources_cuda.md scripts/cuda_build_check.sh
#
#   CUDA_VENV=.venv-cuda  CUDA_TORCH_SPEC=torch==2.14.1  TORCH_CUDA_ARCH_LIST=9.0  CUDA_HOME=/usr/local/cuda
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
VENV=${CUDA_VENV:-.venv-cuda}
if [ ! -x "$VENV/bin/python" ]; then python3 -m venv "$VENV"; fi
. "$VENV/bin/activate"
pip install -q "${CUDA_TORCH_SPEC:-torch==2.14.1}" numpy ninja pybind11 setuptools wheel
python -c "import torch, sys; sys.exit(0 if torch.version.cuda else 'torch in $VENV is not a CUDA build')"
SITE=$(python -c "import site; print(site.getsitepackages()[0])")
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export CPATH="$SITE/nvidia/cu13/include${CPATH:+:$CPATH}"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-2}
# Build from a copy so this build's objects never mix with the CPU build's (build/, in-place .so).
SRC=$(mktemp -d)
trap 'rm -rf "$SRC"' EXIT
tar -c --exclude='./.venv*' --exclude=./build --exclude='*.so' --exclude='./.git' . | tar -x -C "$SRC"
LOG="$SRC/build.log"
start=$(date +%s)
if ! (cd "$SRC" && GRADREG_CUDA=1 GRADREG_PTXAS_VERBOSE=1 pip install -v --no-build-isolation --no-deps . > "$LOG" 2>&1); then
  tail -n 40 "$LOG"; echo "CUDA build failed"; exit 1
fi
echo "CUDA build of gradreg_fast._C took $(( $(date +%s) - start )) s"
if [ -n "${CUDA_BUILD_LOG:-}" ]; then cp "$LOG" "$CUDA_BUILD_LOG"; fi
REPORT=${CUDA_RESOURCE_REPORT:+$(realpath -m "$CUDA_RESOURCE_REPORT")}
made="TORCH_CUDA_ARCH_LIST=\"$TORCH_CUDA_ARCH_LIST\" scripts/cuda_build_check.sh (torch $(python -c 'import torch; print(torch.__version__)'), $("$CUDA_HOME/bin/nvcc" --version | grep -o 'release [0-9.]*'))"
cd /tmp
# ptxas -v of every kernel (registers, spills, shared memory): a summary here, the table on request
python "$ROOT/scripts/triton_aot.py" cuda "$LOG" --threads 256 --generated-by "$made" ${REPORT:+--report "$REPORT"}
python - <<'PY'
import torch
import gradreg_fast
from gradreg_fast import _build_info
assert _build_info.with_cuda, "the build did not include the CUDA kernels"
cpu = {op for op in torch._C._dispatch_get_registrations_for_dispatch_key("CPU") if op.startswith("gradreg_fast::")}
cuda = {op for op in torch._C._dispatch_get_registrations_for_dispatch_key("CUDA") if op.startswith("gradreg_fast::")}
print("ops with CPU kernels: ", sorted(cpu))
print("ops with CUDA kernels:", sorted(cuda))
missing = cpu - cuda
assert cpu and not missing, f"ops without a CUDA kernel: {sorted(missing)}"
print("backends:", {k: v.available for k, v in gradreg_fast.backends().items()})
x = torch.randn(3, 4, dtype=torch.float64)
torch.testing.assert_close(gradreg_fast.ops.sq_norm(x, backend="cpp"), x.pow(2).sum(1))
print("CUDA build check passed")
PY
