#!/usr/bin/env bash
# Download the wheels a device call carries in .whl/ (see device_setup.sh): ModelOpt and the packages it needs that
# the device image (torch 2.11, Python 3.12) lacks, pinned to the versions tested here. About 21 MiB; the device
# tool carries 64 MiB in all (checkout + wheels + benchmarks.slim_fashion_mnist's 5.6 MiB of data).
#   bash benchmarks/device_wheels.sh && echo /.whl/ >> .git/info/exclude
set -euo pipefail
platforms=()
for tag in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$tag")
done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${platforms[@]}" \
  -d .whl nvidia-modelopt==0.47.0 pulp==3.3.2 omegaconf==2.4.0 nvidia-ml-py==13.615.71 pydantic==2.13.4 \
  pydantic-core==2.46.4 annotated-types==0.7.0 typing-inspection==0.4.2
ls .whl
