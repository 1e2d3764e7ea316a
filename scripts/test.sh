#!/usr/bin/env bash
# README command 2: install, then run the whole test suite (what CI runs).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
bash scripts/install_slurm.sh
HF_HUB_OFFLINE=1 .venv/bin/python -m pytest -ra "$@"
