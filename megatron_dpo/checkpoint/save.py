"""Step directories under ``checkpointing.checkpoint_dir``, written atomically.

Every rank writes its shards into ``.tmp_step_N/``; after a barrier rank 0
writes the small files and renames the directory to ``step_N/``. A reader
therefore only ever sees complete step directories; a crash leaves a
``.tmp_*`` directory that the next save of that step replaces.
"""

import json
import os
import re
import shutil
from typing import List, Optional

import torch
import torch.distributed as dist

from megatron_dpo.checkpoint.dist import save_policy
from megatron_dpo.config.load import save_config
from megatron_dpo.models.source import ARCH_FILE

STEP_DIR = re.compile(r"^step_(\d+)$")
TRAIN_STATE_FILE = "train_state.json"


def step_dir(checkpoint_dir: str, step: int) -> str:
    return os.path.join(checkpoint_dir, f"step_{step}")


def complete_steps(checkpoint_dir: str) -> List[int]:
    """Steps with a complete checkpoint, ascending."""
    if not os.path.isdir(checkpoint_dir):
        return []
    steps = [int(m.group(1)) for m in map(STEP_DIR.match, os.listdir(checkpoint_dir)) if m]
    return sorted(s for s in steps if os.path.isfile(os.path.join(step_dir(checkpoint_dir, s), TRAIN_STATE_FILE)))


def latest_step(checkpoint_dir: str) -> Optional[int]:
    steps = complete_steps(checkpoint_dir)
    return steps[-1] if steps else None


def _write_json(path: str, value: dict) -> None:
    with open(path, "w") as handle:
        json.dump(value, handle, indent=2, sort_keys=True)


def save_checkpoint(run, step: int, train_state: dict) -> str:
    """Collective. Writes ``step_N/`` for the run's policy, optimizer and state."""
    checkpoint_dir = run.cfg.checkpointing.checkpoint_dir
    final = step_dir(checkpoint_dir, step)
    tmp = os.path.join(checkpoint_dir, f".tmp_step_{step}")
    if run.ctx.is_rank0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(os.path.join(tmp, "policy"))
    dist.barrier()
    save_policy(run.policy, run.optimizer, os.path.join(tmp, "policy"))
    torch.save(_rng_state(), os.path.join(tmp, f"rng_rank{run.ctx.rank}.pt"))
    dist.barrier()
    if run.ctx.is_rank0:
        save_config(run.cfg, os.path.join(tmp, "config.yaml"))
        _write_json(os.path.join(tmp, ARCH_FILE), run.arch.to_dict())
        run.tokenizer.save_pretrained(os.path.join(tmp, "tokenizer"))
        state = dict(train_state, scheduler=run.scheduler.state_dict())
        # Written last: its presence marks the directory complete.
        _write_json(os.path.join(tmp, TRAIN_STATE_FILE), state)
        if os.path.isdir(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
    dist.barrier()
    return final


def _rng_state() -> dict:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def prune_checkpoints(run, keep: Optional[int]) -> None:
    """Rank 0 keeps the newest ``keep`` step directories (all when None)."""
    if keep is None or not run.ctx.is_rank0:
        return
    for step in complete_steps(run.cfg.checkpointing.checkpoint_dir)[:-keep]:
        shutil.rmtree(step_dir(run.cfg.checkpointing.checkpoint_dir, step))
