#!/usr/bin/env bash
# One command for a CUDA GPU machine: build the extension with its CUDA kernels, run the test suite on
# CUDA (tests parametrize over devices and backends: cuda and compiled Triton join the matrix), and run
# the op and step benchmarks on the GPU. Results go under ${OUT:-benchmarks/results/gpu}.
# Expects torch (CUDA build), triton, ninja, pybind11, pytest already installed (as on the lent GPU machine).
#
#   scripts/gpu_check.sh            run it all
#   scripts/gpu_check.sh --dry-run  print each command it would run ("+ cmd"), run none of them
#                                   (tests/tooling/test_triton_aot.py checks them on a CPU-only machine)
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=0
case "${1:-}" in
  --dry-run) DRY=1 ;;
  "") ;;
  *) echo "usage: scripts/gpu_check.sh [--dry-run]" >&2; exit 2 ;;
esac
OUT=${OUT:-benchmarks/results/gpu}

# run LOG CMD...: run CMD, showing its output and writing it to LOG; quiet=1 run ...: to LOG only.
# --dry-run prints "+ CMD" instead.
run() {
  local log=$1; shift
  if [ "$DRY" = 1 ]; then printf '+'; printf ' %q' "$@"; printf '\n'; return 0; fi
  if [ "${quiet:-0}" = 1 ]; then "$@" > "$log" 2>&1; else "$@" 2>&1 | tee "$log"; fi
}

[ "$DRY" = 1 ] || mkdir -p "$OUT"
run "$OUT/device.txt" nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
run "$OUT/versions.txt" python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
if [ "$DRY" = 1 ]; then
  export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
else
  export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$(python -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")}
fi
export MAX_JOBS=${MAX_JOBS:-16}
start=$(date +%s)
quiet=1 run "$OUT/build.log" env GRADREG_CUDA=1 GRADREG_PTXAS_VERBOSE=1 pip install -v --no-build-isolation \
  --no-deps -e . || { tail -50 "$OUT/build.log"; exit 1; }
[ "$DRY" = 1 ] || echo "build: $(( $(date +%s) - start )) s" | tee -a "$OUT/device.txt"
# registers / spills / shared memory of the CUDA kernels as built for this GPU
run "$OUT/gpu_resources_cuda.txt" python scripts/triton_aot.py cuda "$OUT/build.log" \
  --report "$OUT/gpu_resources_cuda.md"
run "$OUT/tests.txt" python -m pytest tests -q -ra -x -p no:cacheprovider
# op table (fp32 and bf16; bandwidth against the card's measured copy bandwidth)
for dt in float32 bfloat16; do
  run "$OUT/bench_ops_$dt.txt" python benchmarks/bench_ops.py --device cuda --dtype "$dt" --out "$OUT/ops_$dt"
done
# step table of the estimators issue: LeNet at batch 256 and the ResNet at batch 128, fp32 and bf16 autocast
for amp in none bf16; do
  run "$OUT/bench_step_lenet_$amp.txt" python benchmarks/bench_step.py --device cuda --models lenet --batch 256 \
    --amp "$amp" --tag "lenet_$amp" --out "$OUT"
  run "$OUT/bench_step_resnet_$amp.txt" python benchmarks/bench_step.py --device cuda --models resnet --batch 128 \
    --amp "$amp" --tag "resnet_$amp" --penalties doubleback,spectreg,frobreg --out "$OUT"
done
