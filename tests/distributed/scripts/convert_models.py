"""Convert HF directories to megatron_dpo checkpoints and back, in one process.

    python tests/distributed/scripts/convert_models.py ROOT MAX_SHARD_BYTES NAME ...

For each NAME: ROOT/hf_NAME -> ROOT/megatron_NAME -> ROOT/roundtrip_NAME (HF
files of at most MAX_SHARD_BYTES).
"""

import os
import sys

from megatron_dpo.checkpoint.hf_export import megatron_to_hf
from megatron_dpo.checkpoint.hf_import import hf_to_megatron
from megatron_dpo.parallel.init import init_distributed, shutdown


def main() -> None:
    root, max_shard_bytes, names = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    init_distributed()
    for name in names:
        megatron_dir = hf_to_megatron(os.path.join(root, f"hf_{name}"), os.path.join(root, f"megatron_{name}"))
        megatron_to_hf(megatron_dir, os.path.join(root, f"roundtrip_{name}"), max_shard_bytes)
    shutdown()


# The guard matters: dist_checkpointing's writer re-imports the main module.
if __name__ == "__main__":
    main()
