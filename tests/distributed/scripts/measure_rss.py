"""Peak RSS of one conversion, over this process's RSS before it starts.

    python tests/distributed/scripts/measure_rss.py import HF_DIR OUT
    python tests/distributed/scripts/measure_rss.py export CHECKPOINT_DIR OUT MAX_SHARD_BYTES

Prints one JSON line: {"baseline_bytes", "peak_bytes"}: the process's RSS
high-water mark (Linux VmHWM; unlike ru_maxrss it does not inherit the
parent's across exec) after imports and init, and after the conversion.
"""

import json
import sys

from megatron_dpo.checkpoint.hf_export import megatron_to_hf
from megatron_dpo.checkpoint.hf_import import hf_to_megatron
from megatron_dpo.parallel.init import init_distributed, shutdown


def peak_rss_bytes() -> int:
    with open("/proc/self/status") as handle:
        line = next(line for line in handle if line.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024  # kB


def main() -> None:
    direction, source, out = sys.argv[1:4]
    init_distributed()
    baseline = peak_rss_bytes()
    if direction == "import":
        hf_to_megatron(source, out)
    else:
        megatron_to_hf(source, out, int(sys.argv[4]))
    print(json.dumps({"baseline_bytes": baseline, "peak_bytes": peak_rss_bytes()}))
    shutdown()


# The guard matters: dist_checkpointing's writer re-imports the main module.
if __name__ == "__main__":
    main()
