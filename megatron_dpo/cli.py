"""Entry points used by scripts/: ``run_dpo`` (train) and ``validate-config``."""

import argparse
import logging
import os
import sys
import warnings
from typing import List, Optional

from megatron_dpo.config import ConfigError, load_config
from megatron_dpo.data import DataError

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "dpo.yaml")


def _quiet_library_warnings() -> None:
    # megatron-core warns once per module that TE/apex are absent; the run
    # banner states which kernels are in use instead.
    warnings.filterwarnings("ignore", message=r".*(Transformer Engine|Apex).*not installed.*")
    warnings.filterwarnings("ignore", message=r".*cuda_graph_scope.*")


def _parse(argv: Optional[List[str]], description: str):
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", default=None, help=f"YAML config (default: {DEFAULT_CONFIG})")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. dpo.max_num_epochs=1")
    args = parser.parse_args(argv)
    path = args.config
    if path is None and os.path.isfile(DEFAULT_CONFIG):
        path = DEFAULT_CONFIG
    return path, args.overrides


def _is_rank0() -> bool:
    return os.environ.get("RANK", "0") == "0"


def run_dpo(argv: Optional[List[str]] = None) -> int:
    """Train. Returns the process exit code."""
    _quiet_library_warnings()
    logging.basicConfig(level=logging.INFO if _is_rank0() else logging.WARNING, format="%(message)s")
    try:
        path, overrides = _parse(argv, "DPO training on megatron-core")
        cfg = load_config(path, overrides)
        from megatron_dpo.train.loop import train

        train(cfg)
    except (ConfigError, DataError) as error:
        if _is_rank0():
            print(f"error: {error}", file=sys.stderr)
        return 2
    finally:
        from megatron_dpo.parallel.init import shutdown

        shutdown()
    return 0
