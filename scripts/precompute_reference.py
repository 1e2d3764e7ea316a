"""Compute the reference log-probs of reference.mode=cached once, without training.

Takes the training command's config and overrides; the cache lands where
training looks for it (reference.cache_dir, default
<checkpointing.checkpoint_dir>/reference_cache):

    torchrun --nproc_per_node=N scripts/precompute_reference.py --config configs/dpo.yaml key=value ...
"""

import sys

from megatron_dpo.cli import precompute_reference

if __name__ == "__main__":
    sys.exit(precompute_reference())
