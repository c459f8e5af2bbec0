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
# op table (fp32 and bf16; bandwidth against the card's measured copy bandwidth)
for dt in float32 bfloat16; do
  python benchmarks/bench_ops.py --device cuda --dtype "$dt" --out "$OUT/ops_$dt" 2>&1 | tee "$OUT/bench_ops_$dt.txt"
done
# step table of the estimators issue: LeNet at batch 256 and the ResNet at batch 128, fp32 and bf16 autocast
for amp in none bf16; do
  python benchmarks/bench_step.py --device cuda --models lenet --batch 256 --amp "$amp" --tag "lenet_$amp" \
    --out "$OUT" 2>&1 | tail -60 | tee "$OUT/bench_step_lenet_$amp.txt"
  python benchmarks/bench_step.py --device cuda --models resnet --batch 128 --amp "$amp" --tag "resnet_$amp" \
    --penalties doubleback,spectreg,frobreg --out "$OUT" 2>&1 | tail -40 | tee "$OUT/bench_step_resnet_$amp.txt"
done
