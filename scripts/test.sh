#!/usr/bin/env bash
# Sets up everything (venv, Slurm + MariaDB + munge packages) and runs the
# whole test suite. The tests start their own Slurm cluster and MLflow
# server and stop them by PID.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/install_slurm.sh
exec .venv/bin/python -m pytest -q --durations=15 "$@" tests
