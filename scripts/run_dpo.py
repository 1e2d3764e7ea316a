"""Train a policy with DPO.

    torchrun --nproc_per_node=N scripts/run_dpo.py --config configs/dpo.yaml key=value ...
    python scripts/run_dpo.py ...          # a world of size 1
"""

import sys

# The guard matters: dist_checkpointing's writer re-imports the main module.
if __name__ == "__main__":
    # First, before the seconds of heavy imports: a rank remembers its torchrun
    # agent while it is still its parent (train/lifetime.py).
    from megatron_dpo.train.lifetime import end_with_parent

    end_with_parent()
    from megatron_dpo.cli import run_dpo

    sys.exit(run_dpo())
elif __name__ == "__mp_main__":  # a helper process a rank spawned: it ends with the rank
    from megatron_dpo.train.lifetime import end_with_spawning_parent

    end_with_spawning_parent()
