"""Start a run fresh, or continue it from a checkpoint exactly as if never stopped.

Continuing restores everything the next step depends on: policy weights and
optimizer state (into any TP/PP/DP layout), the LR schedule's position, the
sampler's position (consumed pairs), the step and fault counters, and each
rank's RNG streams (when the layout is unchanged; they are per rank). The
caller opens the metrics logger with ``resume_step`` so records written after
the checkpoint are dropped.

Before the first step rank 0 tidies ``checkpointing.checkpoint_dir``; nothing
complete is ever deleted:
- ``.tmp_*`` leftovers of killed saves are deleted;
- continuing from step N: step dirs newer than N (another timeline, e.g.
  ``resume=<an older step_N>``) move to ``previous_run_<time>/``;
- starting fresh (``resume=never``, or ``auto`` without a complete step dir)
  where an earlier run left step dirs or metrics: its step dirs, metrics,
  summary, plots, config and TensorBoard logs move to ``previous_run_<time>/``.
"""

import logging
import os
import tempfile
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch.distributed as dist

from megatron_dpo.checkpoint.dist import load_policy
from megatron_dpo.checkpoint.load import check_compatible, find_resume_dir
from megatron_dpo.checkpoint.rng import load_rng
from megatron_dpo.checkpoint.save import STEP_DIR, read_train_state, remove_incomplete
from megatron_dpo.config.errors import ConfigError
from megatron_dpo.config.schema import Config
from megatron_dpo.logging.metrics import METRICS_FILE

logger = logging.getLogger(__name__)

PREVIOUS_RUN_PREFIX = "previous_run_"
RUN_FILES = ("config.yaml", METRICS_FILE, "metrics.png", "summary.json")


@dataclass
class TrainState:
    """What the loop counts, saved in train_state.json with the sampler and schedule."""

    step: int = 0
    skipped_steps: int = 0
    consecutive_nonfinite: int = 0
    val_history: List[dict] = field(default_factory=list)


def layout_of(run) -> Dict[str, Optional[int]]:
    ctx = run.ctx
    return {"tp": ctx.tp_size, "pp": ctx.pp_size, "dp": ctx.dp_size, "vpp": ctx.vpp_size}


def checkpoint_state(run, state: TrainState, sampler, fingerprints: Dict[str, str], metrics: Dict[str, float]) -> dict:
    """The train_state.json of a checkpoint (the scheduler is added by save_checkpoint)."""
    return {
        "step": state.step, "epoch": sampler.epoch, "consumed_pairs": sampler.consumed_pairs,
        "skipped_steps": state.skipped_steps, "consecutive_nonfinite": state.consecutive_nonfinite,
        "val_history": state.val_history, "sampler": sampler.state_dict(), "layout": layout_of(run),
        "fingerprints": fingerprints, "metrics": metrics,
    }


def prepare_run_dir(cfg: Config, is_rank0: bool) -> Optional[str]:
    """Collective: the step dir to continue from (None: start fresh), with the run dir tidied."""
    directory = find_resume_dir(cfg.checkpointing)
    dist.barrier()  # every rank has chosen before rank 0 moves anything
    if is_rank0:
        _tidy(cfg, directory)
    dist.barrier()
    return directory


def _tidy(cfg: Config, resume_dir: Optional[str]) -> None:
    run_dir = cfg.checkpointing.checkpoint_dir
    if not os.path.isdir(run_dir):
        return
    for name in remove_incomplete(run_dir):
        logger.warning("deleted %s: an incomplete checkpoint of a killed save", os.path.join(run_dir, name))
    steps = {name: int(m.group(1)) for name in os.listdir(run_dir) if (m := STEP_DIR.match(name))}
    if resume_dir is not None:
        resumed_step = read_train_state(resume_dir)["step"]
        _move_aside(run_dir, [name for name, step in steps.items() if step > resumed_step])
    elif steps or os.path.exists(os.path.join(run_dir, METRICS_FILE)):
        logs = [] if os.path.isabs(cfg.logger.log_dir) else [cfg.logger.log_dir]
        names = list(steps) + [n for n in (*RUN_FILES, *logs) if os.path.exists(os.path.join(run_dir, n))]
        _move_aside(run_dir, names)


def _move_aside(run_dir: str, names: List[str]) -> None:
    if not names:
        return
    archive = tempfile.mkdtemp(prefix=f"{PREVIOUS_RUN_PREFIX}{time.strftime('%Y%m%d-%H%M%S')}_", dir=run_dir)
    for name in names:
        os.replace(os.path.join(run_dir, name), os.path.join(archive, name))
    logger.warning("moved %s of an earlier run from %s to %s", ", ".join(sorted(names)), run_dir, archive)


def restore(run, directory: str, sampler, fingerprints: Dict[str, str]) -> TrainState:
    """Collective: load the checkpoint in ``directory`` into the run and sampler."""
    saved = read_train_state(directory)
    check_compatible(directory, saved, run.arch.to_dict(), fingerprints, run.cfg.checkpointing.allow_config_change)
    load_policy(run.policy, run.optimizer, os.path.join(directory, "policy"))
    # The schedule's shape comes from the config; its position from the checkpoint.
    run.scheduler.step(increment=saved["scheduler"]["num_steps"])
    same_data = saved["fingerprints"] == fingerprints
    position = saved["sampler"] if same_data else dict(sampler.state_dict(), consumed_pairs=saved["consumed_pairs"])
    try:
        sampler.load_state_dict(position)
    except ValueError as error:
        raise ConfigError(f"cannot resume from {directory}: {error}") from error
    if saved["layout"] == layout_of(run):
        load_rng(directory, run.ctx.rank)
    return TrainState(
        step=saved["step"], skipped_steps=saved["skipped_steps"],
        consecutive_nonfinite=saved["consecutive_nonfinite"], val_history=saved["val_history"],
    )
