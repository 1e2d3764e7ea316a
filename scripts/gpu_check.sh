#!/usr/bin/env bash
# Check a GPU machine in one command: prints one JSON summary, exits 1 on any
# failed check (megatron_dpo/perf/gpu_check.py lists the checks).
#   bash scripts/gpu_check.sh             # on one H100/H200 (~1B model, bf16)
#   bash scripts/gpu_check.sh --dry-run   # the same on CPU, tiny; GPU-only checks reported not_run
# Options: --out FILE also writes the JSON there. PYTHON overrides the interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
for arg in "$@"; do
    if [ "$arg" = "--dry-run" ]; then export CUDA_VISIBLE_DEVICES=""; fi
done
export HF_HUB_OFFLINE=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "$PYTHON" scripts/gpu_check.py "$@"
