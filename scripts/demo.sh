#!/usr/bin/env bash
# README command 1: install, then DPO on the embedded demo data on 2 CPU ranks.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
bash scripts/install.sh
installed=$(date +%s)
HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 .venv/bin/torchrun --nproc_per_node=2 \
  scripts/run_dpo.py --config configs/dpo.yaml "$@"
end=$(date +%s)
echo "install: $((installed - start)) s, training: $((end - installed)) s"
echo "results: $(pwd)/results/dpo  (metrics.jsonl, metrics.png, summary.json, step_N/)"
