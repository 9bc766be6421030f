#!/usr/bin/env bash
# One device call of the accuracy benchmark: install carried wheels (.whl/, for ModelOpt), start CUDA MPS where
# the machine allows it (kernels of the worker processes then run side by side), run the matrix with workers.
#   bash benchmarks/gpu_session.sh OUT_DIR SECONDS WORKERS [benchmarks.accuracy arguments...]
set -u
out=$1; seconds=$2; workers=$3; shift 3
source "$(dirname "$0")/device_setup.sh"
# ModelOpt builds its CUDA extension on first use: once, here, not in every worker at the same time
python3 -c "from modelopt.torch.quantization.extensions import get_cuda_ext; print('modelopt ext', get_cuda_ext() is not None)" &
# CPTV_FRESH=1: an empty record file (runs already in accuracy.json are run again, e.g. to record new fields)
if [ -z "${CPTV_FRESH:-}" ]; then cp benchmarks/results/accuracy.json "$out/accuracy.json"; fi
# no new run after the deadline: a compiled search of the reference models takes up to ~2 min while the workers
# share the GPU (eager ModelOpt searches took ~4 min before they compiled)
# (CPTV_DEADLINE_MARGIN: seconds kept free at the end; longer for presets with the gradient stage)
deadline=$((seconds - ${CPTV_DEADLINE_MARGIN:-160})); [ "$deadline" -lt $((seconds / 3)) ] && deadline=$((seconds / 3))
timeout -s INT "$seconds" python3 -m benchmarks.accuracy --workers "$workers" --deadline "$deadline" \
  --out "$out/accuracy.json" "$@" 2>&1 | grep -v -i "warn" | tee "$out/log"
wait
