#!/usr/bin/env bash
# Installs the vLLM bundle (../shared/device/README.md) from /tmp/parts into
# $1 (default /tmp/site) unless it is there already; for bench/run_all.sh and
# bench/world2_check.sh on the GPU machine.
set -eo pipefail
SITE=${1:-/tmp/site}
PY=${PYTHON:-python3}
[ -d "$SITE/vllm" ] && exit 0
[ -d /tmp/parts ] || { echo "no vLLM bundle: neither $SITE/vllm nor /tmp/parts" >&2; exit 1; }
cd /tmp && cat parts/p* > bundle.tar && mkdir -p b "$SITE" && tar -C b -xf bundle.tar
tar -C "$SITE" -xJf b/vllm.tar.xz
"$PY" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" b/wheels/*.whl
