#!/usr/bin/env bash
# One command for a CUDA GPU machine: build the extension with its CUDA kernels, run the test suite on
# CUDA (tests parametrize over devices and backends: cuda and compiled Triton join the matrix), and run
# the op and step benchmarks on the GPU. Results go under ${OUT:-benchmarks/results/gpu}.
# Expects torch (CUDA build), triton, ninja, pybind11, pytest already installed (as on the lent GPU machine).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu}
mkdir -p "$OUT"
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
} | tee "$OUT/device.txt"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$(python -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")}
export MAX_JOBS=${MAX_JOBS:-16}
start=$(date +%s)
GRADREG_CUDA=1 pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1 || { tail -50 "$OUT/build.log"; exit 1; }
echo "build: $(( $(date +%s) - start )) s" | tee -a "$OUT/device.txt"
python -m pytest tests -q -ra -x -p no:cacheprovider 2>&1 | tail -40 | tee "$OUT/tests.txt"
if [ -f benchmarks/bench_ops.py ]; then
  python benchmarks/bench_ops.py --device cuda --out "$OUT" 2>&1 | tee "$OUT/bench_ops.txt"
fi
if [ -f benchmarks/bench_step.py ]; then
  python benchmarks/bench_step.py --device cuda --out "$OUT" 2>&1 | tee "$OUT/bench_step.txt"
fi
