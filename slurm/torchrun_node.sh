#!/bin/bash
# One node's part of slurm/dpo.sbatch (run by its srun, one task per node):
#
#   torchrun_node.sh HEAD:PORT [run_dpo.py arguments...]
#
# Starts a torchrun agent with NPROC_PER_NODE ranks of scripts/run_dpo.py; the agents of all nodes meet
# at the c10d rendezvous HEAD:PORT.
#
# Signals. Slurm sends a step's signal (--signal=USR1@T, scancel --signal=USR1) to every process of the
# step, ranks included (proctrack/cgroup, proctrack/linuxproc). The ranks catch USR1 and TERM
# (megatron_dpo/train/signals.py): they finish the step, save and exit 0. torchrun does not handle USR1 -
# it would die of it and its ranks with it - so it starts with USR1 ignored (the ranks set their own
# handler). A clean exit after a USR1 exits PREEMPTED_EXIT, which tells the batch script to requeue.
set -uo pipefail

rdzv_endpoint=$1
shift

trap '' USR1
"$PYTHON" -m torch.distributed.run --nnodes="$SLURM_NNODES" --nproc-per-node="$NPROC_PER_NODE" \
  --rdzv-backend=c10d --rdzv-endpoint="$rdzv_endpoint" --rdzv-id="$SLURM_JOB_ID" --max-restarts=0 \
  "$DPO_DIR/scripts/run_dpo.py" "$@" &
agent=$!

preempted=0
trap 'preempted=1' USR1
wait "$agent"
rc=$?
while kill -0 "$agent" 2>/dev/null; do  # a trapped signal interrupts wait: wait again
  wait "$agent"
  rc=$?
done

if (( rc == 0 && preempted )); then
  exit "$PREEMPTED_EXIT"
fi
exit "$rc"
