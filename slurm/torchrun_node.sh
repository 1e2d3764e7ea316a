#!/bin/bash
# One node's part of slurm/dpo.sbatch (run by its srun, one task per node):
#
#   torchrun_node.sh HEAD:PORT [run_dpo.py arguments...]
#
# Starts a torchrun agent with NPROC_PER_NODE ranks of scripts/run_dpo.py; the agents of all nodes meet
# at the c10d rendezvous HEAD:PORT.
#
# Time limit. With JOB_END_TIME set (the batch script sets it from the job's time limit), the ranks get
# a checkpointing.checkpoint_must_save_by budget computed here, just before they start, so that they
# stop, save and exit 0 in time (slurm/job_state.py says how the margin is made).
#
# Signals. Slurm sends a step's signal (scancel --signal=USR1, --signal=USR1@T) to every process of the
# step, ranks included (proctrack/cgroup, proctrack/linuxproc). The ranks catch USR1 and TERM
# (megatron_dpo/train/signals.py): they finish the step, save and exit 0. This script and torchrun do not
# handle USR1 - they would die of it and the ranks with them - so they ignore it (the ranks set their own
# handler). A clean stop thus exits 0 on every node: srun's --kill-on-bad-exit stays quiet, and the
# batch script decides to requeue from the run's summary.json.
set -euo pipefail
trap '' USR1

rdzv_endpoint=$1
shift

lines=$("$PYTHON" "$DPO_DIR/slurm/job_state.py" run-args "$@")
run_args=()
[[ -z $lines ]] || mapfile -t run_args <<<"$lines"
exec "$PYTHON" -m torch.distributed.run --nnodes="$SLURM_NNODES" --nproc-per-node="$NPROC_PER_NODE" \
  --rdzv-backend=c10d --rdzv-endpoint="$rdzv_endpoint" --rdzv-id="$SLURM_JOB_ID" --max-restarts=0 \
  "$DPO_DIR/scripts/run_dpo.py" "${run_args[@]}"
