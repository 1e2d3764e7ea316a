#!/usr/bin/env bash
# Debian's Slurm and munge, for tests/slurm (a one-node Slurm started by the
# tests themselves). Needs root; a no-op where sbatch and munged already exist.
set -euo pipefail
export PATH=$PATH:/usr/sbin:/sbin
if command -v sbatch >/dev/null && command -v munged >/dev/null; then
  exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
  echo "install_slurm: needs root and apt-get; tests/slurm will be skipped (or fail under CI)" >&2
  exit 0
fi
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
echo "installed slurm-wlm and munge"
