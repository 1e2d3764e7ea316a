"""Check a GPU machine (or, with --dry-run, the same on CPU); see megatron_dpo/perf/gpu_check.py."""

import sys

if __name__ == "__main__":  # dist_checkpointing's writer re-imports the main module
    from megatron_dpo.cli import _quiet_library_warnings
    from megatron_dpo.perf.gpu_check import main

    _quiet_library_warnings()
    sys.exit(main())
