#!/usr/bin/env bash
# After ../shared/tools/device-bundle: adds to .device/wheels what the GPU machine still lacks to run the
# job as it ships and benchmarks/gpu_node.py: the job's own dependencies that the bundle leaves out
# (python-gdcm, zlib-ng, tqdm, at the pins of docker/requirements.txt) and pytest for tests/test_gpu.py.
# `source .device/activate` installs every wheel there. From the project root:
#   ../shared/tools/device-bundle && bash benchmarks/device_extras.sh
set -euo pipefail
root=$(git rev-parse --show-toplevel); cd "$root"
[ -f .device/activate ] || { echo "no .device/: run ../shared/tools/device-bundle first" >&2; exit 1; }
plat=(--only-binary=:all: --python-version 3.12 --implementation cp
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
pin() { grep -E "^$1==" docker/requirements.txt; }
python3 -m pip download -q --no-deps "${plat[@]}" -d .device/wheels \
  "$(pin python-gdcm)" "$(pin zlib-ng)" "$(pin tqdm)" pytest pluggy iniconfig packaging
du -sh .device
