# Sourced by the device-call scripts (gpu_session.sh, stage_variants_session.sh): install the carried wheels
# (.whl/, for ModelOpt) into /tmp/site once per machine, put the checkout and them on PYTHONPATH, and start CUDA MPS
# where the machine allows it (the kernels of several worker processes then run side by side).
# Two sessions may run side by side in one device call (different matrices into different OUT_DIRs): the first
# installs the wheels and starts MPS, a second finds both done (flock) and leaves the running daemon alone
if ls .whl/*.whl >/dev/null 2>&1; then
  stamp=/tmp/site/.installed-$(ls .whl | md5sum | cut -c1-12)  # other wheels on a warm machine: install again
  install="[ -e $stamp ] || { python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --upgrade --target /tmp/site .whl/*.whl && touch $stamp; }"
  if command -v flock >/dev/null; then flock /tmp/site.lock sh -c "$install"; else sh -c "$install"; fi
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1 CPTV_FASHION_MNIST_DIR=${CPTV_FASHION_MNIST_DIR:-$PWD/.fmnist}
# (a process's name is cut to 15 characters: nvidia-cuda-mps is the control daemon or its server)
if { pgrep -x nvidia-cuda-mps >/dev/null || nvidia-cuda-mps-control -d 2>/dev/null; } && python3 -c "import torch; torch.ones(1, device='cuda')"; then
  echo "MPS on"
else
  echo quit | nvidia-cuda-mps-control 2>/dev/null; echo "MPS off"
fi
