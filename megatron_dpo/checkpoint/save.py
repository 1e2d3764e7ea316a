"""Step directories under ``checkpointing.checkpoint_dir``: written atomically, pruned.

Every rank writes its shards into ``.tmp_step_N/`` and hashes them while they
are in its page cache; after a barrier rank 0 writes the small files, then
the manifest of every file (checkpoint/manifest.py) last, and renames the
directory to ``step_N/`` with one ``os.replace`` (atomic within a file
system). With ``checkpointing.async_save`` the shards are written in the
background (``start_checkpoint``), and all of this after they are finalized
(``complete_checkpoint``): nothing is hashed, listed or renamed before. A reader therefore only ever sees complete step directories, and can
check every byte of one against its manifest. A process killed
mid-save leaves a ``.tmp_*`` directory: ``remove_incomplete`` deletes it
before the next run looks for a checkpoint. Pruning renames a directory to
``.tmp_*`` before deleting it, so a kill mid-delete leaves no half step dir.
File names: checkpoint/files.py.
"""

import copy
import json
import math
import os
import shutil
from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.distributed as dist

from megatron_dpo.checkpoint.dist import checkpoint_errors, finish_async_saves, save_policy
from megatron_dpo.checkpoint.errors import CheckpointSaveError
from megatron_dpo.checkpoint.files import (
    ARCH_FILE, CONFIG_FILE, STEP_DIR, TMP_PREFIX, TOKENIZER_DIR, TRAIN_STATE_FILE, is_complete, policy_dir,
    rank_files, step_dir, tmp_step_dir,
)
from megatron_dpo.checkpoint.manifest import file_entries, write_manifest
from megatron_dpo.checkpoint.rng import save_rng
from megatron_dpo.config.load import save_config
from megatron_dpo.config.schema import CheckpointingConfig, Config
from megatron_dpo.models.architecture import ModelArchitecture


@dataclass(frozen=True)
class ModelFiles:
    """What a step directory records besides the training state, so that it
    can serve as ``policy.model_name``: the resolved config, the
    architecture and the tokenizer."""

    config: Config
    arch: ModelArchitecture
    tokenizer: object


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


@dataclass
class PendingCheckpoint:
    """A step directory whose shards are being written (``start_checkpoint``);
    ``complete_checkpoint`` makes it a complete ``step_N/``."""

    checkpoint_dir: str
    step: int
    rank: int
    train_state: dict  # with the scheduler's state, as of the save
    model_files: ModelFiles
    async_queue: object  # megatron-core's AsyncCallsQueue, or None (shards written)
    problem: Optional[str] = None  # a failure every rank already knows of


def save_checkpoint(checkpoint_dir: str, step: int, chunks: List[torch.nn.Module], optimizer, scheduler,
                    train_state: dict, rank: int, model_files: ModelFiles,
                    optimizer_format: str = "dp_reshardable") -> str:
    """Collective. Writes ``step_N/`` with the policy chunks, the optimizer and
    scheduler state, ``train_state`` and ``model_files``; returns its path.
    A write that fails on any rank (a full disk, a quota) raises
    CheckpointSaveError on every rank, with the half-written directory removed."""
    return complete_checkpoint(start_checkpoint(checkpoint_dir, step, chunks, optimizer, scheduler, train_state,
                                                rank, model_files, optimizer_format))


def start_checkpoint(checkpoint_dir: str, step: int, chunks: List[torch.nn.Module], optimizer, scheduler,
                     train_state: dict, rank: int, model_files: ModelFiles,
                     optimizer_format: str = "dp_reshardable", async_queue=None) -> PendingCheckpoint:
    """Collective: ``save_checkpoint`` up to the shards. With ``async_queue``
    (checkpointing.async_save) they are still being written when it returns;
    the RNG files and a copy of the train and scheduler state are taken now."""
    tmp = tmp_step_dir(checkpoint_dir, step)
    state = copy.deepcopy(dict(train_state, scheduler=scheduler.state_dict() if scheduler is not None else None))
    pending = PendingCheckpoint(checkpoint_dir, step, rank, state, model_files, async_queue)
    pending.problem = _on_every_rank(lambda: _prepare_tmp(tmp) if rank == 0 else None)
    if pending.problem is None:
        pending.problem = _on_every_rank(lambda: _write_shards(tmp, rank, chunks, optimizer, optimizer_format,
                                                               async_queue))
    return pending


def complete_checkpoint(pending: PendingCheckpoint) -> str:
    """Collective: wait for the shards, then (rank 0) the small files, the
    manifest and the rename; returns the ``step_N/`` path. Raises
    CheckpointSaveError on every rank when any rank's write failed."""
    checkpoint_dir, step, rank = pending.checkpoint_dir, pending.step, pending.rank
    final, tmp = step_dir(checkpoint_dir, step), tmp_step_dir(checkpoint_dir, step)
    problem = pending.problem
    if problem is None and pending.async_queue is not None:
        problem = _on_every_rank(lambda: finish_async_saves(pending.async_queue))
    if problem is None:
        entries = [None] * dist.get_world_size()
        dist.all_gather_object(entries, file_entries(tmp, rank_files(tmp, rank)))
        problem = _on_every_rank(lambda: _publish(tmp, final, entries, pending.train_state, pending.model_files)
                                 if rank == 0 else None)
    if problem is not None:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        dist.barrier()
        raise CheckpointSaveError(f"could not write checkpoint step_{step} in {checkpoint_dir}: {problem} "
                                  f"({_space_note(checkpoint_dir)})")
    return final


def _space_note(checkpoint_dir: str) -> str:
    """How much room the file system has, against the size of the newest checkpoint."""
    free = shutil.disk_usage(checkpoint_dir).free
    note = f"the file system holding {checkpoint_dir} has {free / 2**20:.1f} MiB free"
    newest = latest_step(checkpoint_dir)
    if newest is not None:
        root = step_dir(checkpoint_dir, newest)
        size = sum(os.path.getsize(os.path.join(d, n)) for d, _, names in os.walk(root) for n in names)
        if free < size:
            note += f", less than one checkpoint ({size / 2**20:.1f} MiB): the disk is full"
    return note


def _on_every_rank(action) -> Optional[str]:
    """Collective: run ``action``; every rank learns the first failure (an
    OSError, or dist_checkpointing's own errors, which wrap them)."""
    problem = None
    try:
        action()
    except (OSError, *checkpoint_errors()) as error:
        # DCP's exceptions carry each failed rank's traceback: its last line is the cause.
        lines = [line for line in str(error).splitlines() if line.strip()]
        problem = f"{type(error).__name__}: {lines[-1].strip()[:1000] if lines else ''}"
    problems = [None] * dist.get_world_size()
    dist.all_gather_object(problems, problem)
    return next((p for p in problems if p is not None), None)


def _prepare_tmp(tmp: str) -> None:
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(policy_dir(tmp))


def _write_shards(tmp: str, rank: int, chunks: List[torch.nn.Module], optimizer, optimizer_format: str,
                  async_queue) -> None:
    save_policy(chunks, optimizer, policy_dir(tmp), optimizer_format, async_queue)
    save_rng(tmp, rank)


def _publish(tmp: str, final: str, entries: List[dict], train_state: dict, model_files: ModelFiles) -> None:
    """Rank 0: the small files, the manifest last, then the rename."""
    save_config(model_files.config, os.path.join(tmp, CONFIG_FILE))
    _write_json(os.path.join(tmp, ARCH_FILE), model_files.arch.to_dict())
    model_files.tokenizer.save_pretrained(os.path.join(tmp, TOKENIZER_DIR))
    _write_json(os.path.join(tmp, TRAIN_STATE_FILE), train_state)
    write_manifest(tmp, {name: entry for rank_entries in entries for name, entry in rank_entries.items()})
    # Fails loudly rather than replace an existing step_N (resume moves newer
    # step dirs aside, so a run never saves a step twice).
    os.replace(tmp, final)


def _metric(value) -> Optional[float]:
    """A recorded metric, or None when missing or not finite (json_safe saves NaN/inf as null)."""
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def _ranked(checkpoint_dir: str, steps: List[int], cfg: CheckpointingConfig) -> List[int]:
    """Steps best first: by ``metric_name`` (steps without a finite value last), else newest first."""
    newest_first = sorted(steps, reverse=True)
    if cfg.metric_name is None:
        return newest_first
    values = {s: _metric(read_train_state(step_dir(checkpoint_dir, s)).get("metrics", {}).get(cfg.metric_name))
              for s in newest_first}
    sign = -1.0 if cfg.higher_is_better else 1.0
    with_metric = sorted((s for s in newest_first if values[s] is not None), key=lambda s: sign * values[s])
    return with_metric + [s for s in newest_first if values[s] is None]


def _newest_finite(checkpoint_dir: str, steps: List[int]) -> Optional[int]:
    """The newest step whose recorded metrics are all finite (a run never saves
    a non-finite step, but a directory may hold older checkpoints)."""
    for step in sorted(steps, reverse=True):
        metrics = read_train_state(step_dir(checkpoint_dir, step)).get("metrics", {})
        if all(_metric(value) is not None for value in metrics.values()):
            return step
    return None


def prune_checkpoints(cfg: CheckpointingConfig) -> List[int]:
    """Keep the ``keep_top_k`` best step dirs, the newest and the newest
    finite one; returns the steps removed. Rank 0 only."""
    steps = complete_steps(cfg.checkpoint_dir)
    if cfg.keep_top_k is None or not steps:
        return []
    keep = set(_ranked(cfg.checkpoint_dir, steps, cfg)[:cfg.keep_top_k]) | {steps[-1]}
    keep.add(_newest_finite(cfg.checkpoint_dir, steps))
    removed = [s for s in steps if s not in keep]
    for step in removed:
        doomed = os.path.join(cfg.checkpoint_dir, f"{TMP_PREFIX}removing_step_{step}")
        os.replace(step_dir(cfg.checkpoint_dir, step), doomed)
        shutil.rmtree(doomed)
    return removed
