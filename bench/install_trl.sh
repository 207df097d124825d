#!/usr/bin/env bash
# On the GPU machine: installs the TRL carry (bench/build_trl_carry.sh) into the vLLM site dir $1
# (default /tmp/site), from .devbundle/trl when this run carries it, else from /tmp/trl-wheels
# (where a run that carried it left a copy: a carried path is gone in the next run, /tmp stays
# while the machine is warm). Idempotent; prints the versions it can import.
set -eo pipefail
SITE=${1:-/tmp/site}
PY=${PYTHON:-python3}
KEEP=/tmp/trl-wheels
if [ -d .devbundle/trl ]; then mkdir -p "$KEEP" && cp .devbundle/trl/*.whl "$KEEP"/; fi
if [ ! -d "$SITE/trl" ]; then
  ls "$KEEP"/trl-*.whl >/dev/null 2>&1 || { echo "no TRL carry: neither $SITE/trl nor $KEEP/trl-*.whl" >&2; exit 1; }
  mkdir -p "$SITE"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "$KEEP"/*.whl
fi
PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}" "$PY" -c \
  "import trl, datasets, multiprocess, dill; print('trl', trl.__version__, 'datasets', datasets.__version__, 'dill', dill.__version__)"
