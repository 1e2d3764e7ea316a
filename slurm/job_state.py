"""What slurm/dpo.sbatch asks of a run: its time budget, and whether to requeue.

    job_state.py run-args [run_dpo.py arguments]       # this attempt's arguments, one per line
    job_state.py stopped-early [run_dpo.py arguments]  # exit 0: requeue

``run-args`` (torchrun_node.sh, on every node just before torchrun starts)
prints the arguments with ``checkpointing.checkpoint_must_save_by`` added last:
the job's end time (``JOB_END_TIME``, epoch seconds, set by the batch script;
none: no budget) turned into a budget from process start. The ranks stop when the next step plus a save would overrun it,
using the step and save seconds they measure (train/signals.py); they measure
a save only once they have made one, so the budget also leaves out the longest
save of the previous attempt (``max_save_time_s`` in the run directory's
summary.json) and ``TIME_LIMIT_MARGIN`` seconds (start-up of the ranks, their
exit, the requeue; on a first attempt also the save). A smaller budget given in
the arguments wins.

``stopped-early`` (the batch script, after srun returned 0) exits 0 when the
run's summary.json says the run stopped before its last step (a signal, or the
budget): the job should be requeued to go on. It exits 1 when the run finished.
The summary is this attempt's: srun returns 0 only when every rank exited 0,
and rank 0 exits 0 only after writing it.
"""

import argparse
import json
import os
import sys
import time
from typing import Optional

import megatron_dpo
from megatron_dpo.config import ConfigError, load_config
from megatron_dpo.config.load import duration_seconds

# scripts/run_dpo.py's default config (megatron_dpo.cli.DEFAULT_CONFIG; importing cli would import torch).
DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(megatron_dpo.__file__))),
                              "configs", "dpo.yaml")


def _run_config(args):
    return load_config(args.config or (DEFAULT_CONFIG if os.path.isfile(DEFAULT_CONFIG) else None), args.overrides)


def _summary(run_dir: str) -> Optional[dict]:
    path = os.path.join(run_dir, "summary.json")
    if not os.path.isfile(path):
        return None
    with open(path) as handle:
        return json.load(handle)


def _hh_mm_ss(seconds: int) -> str:
    return f"{seconds // 3600:02d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def _must_save_by(cfg, end_time: float) -> str:
    margin = float(os.environ.get("TIME_LIMIT_MARGIN", "300"))
    previous = _summary(cfg.checkpointing.checkpoint_dir) or {}
    last_save = float(previous.get("max_save_time_s") or 0.0)
    budget = int(end_time - time.time() - margin - last_save)
    if budget <= 0:
        print(f"job_state: the time left leaves no budget after TIME_LIMIT_MARGIN={margin:g} s and the last save "
              f"({last_save:g} s): this attempt trains one step, saves and requeues. Raise --time or lower "
              "TIME_LIMIT_MARGIN.", file=sys.stderr)
        budget = 0
    if cfg.checkpointing.checkpoint_must_save_by is not None:
        budget = min(budget, duration_seconds(cfg.checkpointing.checkpoint_must_save_by))
    override = f"checkpointing.checkpoint_must_save_by={_hh_mm_ss(budget)}"
    if os.environ.get("SLURM_NODEID", "0") == "0":
        print(f"job_state: {override} (time left {end_time - time.time():.0f} s, TIME_LIMIT_MARGIN {margin:g} s, "
              f"last save {last_save:g} s)", file=sys.stderr)
    return override


def run_args(args) -> int:
    run_dpo_args = (["--config", args.config] if args.config else []) + args.overrides
    end_time = os.environ.get("JOB_END_TIME")
    if end_time:
        run_dpo_args.append(_must_save_by(_run_config(args), float(end_time)))
    print("\n".join(run_dpo_args))
    return 0


def stopped_early(args) -> int:
    summary = _summary(_run_config(args).checkpointing.checkpoint_dir)
    return 0 if summary is not None and summary.get("stopped_early") else 1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for name in ("run-args", "stopped-early"):
        command = commands.add_parser(name)
        command.add_argument("--config", default=None)
        command.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    try:
        return run_args(args) if args.command == "run-args" else stopped_early(args)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
