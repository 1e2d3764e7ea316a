#!/usr/bin/env bash
# Create .venv and install megatron_dpo with its test extras.
# torch is installed first and pinned: torch==2.13.0 is the CPU wheel on the
# build machines (any other spec pulls several GB of CUDA build). On a GPU
# cluster, install your CUDA torch first and run: pip install -e '.[gpu]'.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/pip install --quiet --disable-pip-version-check "torch==2.13.0"
.venv/bin/pip install --quiet --disable-pip-version-check -e ".[test]"
.venv/bin/python -c "import megatron.core, megatron_dpo; print('megatron_dpo installed (megatron-core', megatron.core.__version__ + ')')"
