"""Step directories under ``checkpointing.checkpoint_dir``: written atomically, pruned.

Every rank writes its shards into ``.tmp_step_N/``; after a barrier rank 0
writes the small files (``train_state.json`` last) and renames the directory
to ``step_N/`` with one ``os.replace`` (atomic within a file system). A
reader therefore only ever sees complete step directories. A process killed
mid-save leaves a ``.tmp_*`` directory: ``remove_incomplete`` deletes it
before the next run looks for a checkpoint. Pruning renames a directory to
``.tmp_*`` before deleting it, so a kill mid-delete leaves no half step dir.
"""

import json
import os
import re
import shutil
from typing import List, Optional

import torch.distributed as dist

from megatron_dpo.checkpoint.dist import save_policy
from megatron_dpo.checkpoint.rng import save_rng
from megatron_dpo.config.load import save_config
from megatron_dpo.config.schema import CheckpointingConfig
from megatron_dpo.models.source import ARCH_FILE

STEP_DIR = re.compile(r"^step_(\d+)$")
TRAIN_STATE_FILE = "train_state.json"
TMP_PREFIX = ".tmp_"


def step_dir(checkpoint_dir: str, step: int) -> str:
    return os.path.join(checkpoint_dir, f"step_{step}")


def is_complete(directory: str) -> bool:
    return os.path.isfile(os.path.join(directory, TRAIN_STATE_FILE))


def complete_steps(checkpoint_dir: str) -> List[int]:
    """Steps with a complete checkpoint, ascending."""
    if not os.path.isdir(checkpoint_dir):
        return []
    steps = [int(m.group(1)) for m in map(STEP_DIR.match, os.listdir(checkpoint_dir)) if m]
    return sorted(s for s in steps if is_complete(step_dir(checkpoint_dir, s)))


def latest_step(checkpoint_dir: str) -> Optional[int]:
    steps = complete_steps(checkpoint_dir)
    return steps[-1] if steps else None


def read_train_state(directory: str) -> dict:
    with open(os.path.join(directory, TRAIN_STATE_FILE)) as handle:
        return json.load(handle)


def _write_json(path: str, value: dict) -> None:
    with open(path, "w") as handle:
        json.dump(value, handle, indent=2, sort_keys=True)


def remove_incomplete(checkpoint_dir: str) -> List[str]:
    """Delete the ``.tmp_*`` leftovers of killed saves; returns their names."""
    if not os.path.isdir(checkpoint_dir):
        return []
    names = sorted(name for name in os.listdir(checkpoint_dir) if name.startswith(TMP_PREFIX))
    for name in names:
        shutil.rmtree(os.path.join(checkpoint_dir, name))
    return names


def save_checkpoint(run, step: int, train_state: dict) -> str:
    """Collective. Writes ``step_N/`` for the run's policy, optimizer and state."""
    checkpoint_dir = run.cfg.checkpointing.checkpoint_dir
    final = step_dir(checkpoint_dir, step)
    tmp = os.path.join(checkpoint_dir, f"{TMP_PREFIX}step_{step}")
    if run.ctx.is_rank0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(os.path.join(tmp, "policy"))
    dist.barrier()
    save_policy(run.policy, run.optimizer, os.path.join(tmp, "policy"))
    save_rng(tmp, run.ctx.rank)
    dist.barrier()
    if run.ctx.is_rank0:
        save_config(run.cfg, os.path.join(tmp, "config.yaml"))
        _write_json(os.path.join(tmp, ARCH_FILE), run.arch.to_dict())
        run.tokenizer.save_pretrained(os.path.join(tmp, "tokenizer"))
        _write_json(os.path.join(tmp, TRAIN_STATE_FILE), dict(train_state, scheduler=run.scheduler.state_dict()))
        # Fails loudly rather than replace an existing step_N (resume moves
        # newer step dirs aside, so a run never saves a step twice).
        os.replace(tmp, final)
    dist.barrier()
    return final


def _ranked(checkpoint_dir: str, steps: List[int], cfg: CheckpointingConfig) -> List[int]:
    """Steps best first: by ``metric_name`` (steps without it last), else newest first."""
    newest_first = sorted(steps, reverse=True)
    if cfg.metric_name is None:
        return newest_first
    values = {s: read_train_state(step_dir(checkpoint_dir, s)).get("metrics", {}).get(cfg.metric_name)
              for s in newest_first}
    sign = -1.0 if cfg.higher_is_better else 1.0
    with_metric = sorted((s for s in newest_first if values[s] is not None), key=lambda s: sign * values[s])
    return with_metric + [s for s in newest_first if values[s] is None]


def prune_checkpoints(cfg: CheckpointingConfig) -> List[int]:
    """Keep the ``keep_top_k`` best step dirs plus the newest; returns the steps removed.
    Rank 0 only."""
    steps = complete_steps(cfg.checkpoint_dir)
    if cfg.keep_top_k is None or not steps:
        return []
    keep = set(_ranked(cfg.checkpoint_dir, steps, cfg)[:cfg.keep_top_k]) | {steps[-1]}
    removed = [s for s in steps if s not in keep]
    for step in removed:
        doomed = os.path.join(cfg.checkpoint_dir, f"{TMP_PREFIX}removing_step_{step}")
        os.replace(step_dir(cfg.checkpoint_dir, step), doomed)
        shutil.rmtree(doomed)
    return removed
