#!/usr/bin/env bash
# Installs a single-node Slurm stack for the test suite (tests/slurm_harness.py):
# slurmctld, slurmd, slurmdbd, the client tools, munge and MariaDB.
# Idempotent: does nothing when every binary is already there. Debian/Ubuntu
# only (apt-get), must run as root. Nothing is started or enabled here; the
# harness starts its own daemons under a temp dir.
set -euo pipefail

need=(slurmctld slurmd slurmdbd sbatch sacct sacctmgr scontrol sinfo munged mungekey mariadbd mariadb-install-db)
missing=()
for b in "${need[@]}"; do
  command -v "$b" >/dev/null 2>&1 || [ -x "/usr/sbin/$b" ] || missing+=("$b")
done
if [ "${#missing[@]}" -eq 0 ]; then
  exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
  echo "install_slurm: must run as root (missing: ${missing[*]})" >&2
  exit 1
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "install_slurm: apt-get not found; install slurm-wlm, slurmdbd, munge, mariadb-server by hand (missing: ${missing[*]})" >&2
  exit 1
fi

export DEBIAN_FRONTEND=noninteractive
# Keep package maintainer scripts from starting services (no systemd here, and
# the harness runs its own daemons): policy-rc.d exit 101 = "don't start".
prc=/usr/sbin/policy-rc.d
created_prc=0
if [ ! -e "$prc" ]; then
  printf '#!/bin/sh\nexit 101\n' > "$prc"
  chmod +x "$prc"
  created_prc=1
fi
cleanup() { if [ "$created_prc" -eq 1 ]; then rm -f "$prc"; fi; }
trap cleanup EXIT

apt_opts=(-y -q -o Dpkg::Use-Pty=0 -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold --no-install-recommends)
if ! apt-get install "${apt_opts[@]}" slurm-wlm slurmdbd slurm-client munge mariadb-server mariadb-client >/tmp/install_slurm.log 2>&1; then
  apt-get update -q >>/tmp/install_slurm.log 2>&1
  if ! apt-get install "${apt_opts[@]}" slurm-wlm slurmdbd slurm-client munge mariadb-server mariadb-client >>/tmp/install_slurm.log 2>&1; then
    tail -n 40 /tmp/install_slurm.log >&2
    echo "install_slurm: apt-get install failed (log: /tmp/install_slurm.log)" >&2
    exit 1
  fi
fi

for b in "${need[@]}"; do
  if ! command -v "$b" >/dev/null 2>&1 && [ ! -x "/usr/sbin/$b" ]; then
    echo "install_slurm: $b still missing after install" >&2
    exit 1
  fi
done
echo "install_slurm: $(slurmctld -V 2>/dev/null || true), $(munged --version 2>&1 | head -1), $(mariadbd --version 2>/dev/null | head -1)"
