#!/usr/bin/env bash
# Debian's Slurm, munge and iproute2, for tests/slurm (a two-node Slurm in network namespaces, started by
# the tests themselves). Needs root; a no-op where sbatch, munged and ip already exist.
set -euo pipefail
export PATH=$PATH:/usr/sbin:/sbin
if command -v sbatch >/dev/null && command -v munged >/dev/null && command -v ip >/dev/null; then
  exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
  echo "install_slurm: needs root and apt-get; tests/slurm will be skipped (or fail under CI)" >&2
  exit 0
fi
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends slurm-wlm munge iproute2 >/dev/null
echo "installed slurm-wlm, munge and iproute2"
