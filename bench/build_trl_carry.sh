#!/usr/bin/env bash
# Here (with a registry): the TRL carry for the H200 machines, ~1.8 MB of pure-Python wheels
# into .devbundle/trl/ (gitignored). TRL 1.16.0 needs, beyond the device image
# (../shared/device/device_image_packages.txt) and the vLLM bundle (which has dill): datasets and
# multiprocess. dill is carried too, at the bundle's version, so the carry stands alone.
# The carry rides with the vLLM bundle's smallest part (p4, 44 MiB: together < 64 MiB); see bench/README.md.
set -euo pipefail
OUT=${1:-.devbundle/trl}
mkdir -p "$OUT"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation py --abi none \
  --platform any -d "$OUT" trl==1.16.0 datasets==5.2.0 multiprocess==0.70.19 dill==0.4.1
ls -l "$OUT"
