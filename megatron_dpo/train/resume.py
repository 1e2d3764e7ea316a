"""Start a run fresh, or continue it from a checkpoint exactly as if never stopped.

Continuing restores everything the next step depends on: policy weights and
optimizer state (into any TP/PP/DP layout), the LR schedule's position, the
sampler's position (consumed pairs), the step and fault counters, and each
rank's RNG streams (when the layout is unchanged; they are per rank). The
caller opens the metrics logger with ``resume_step`` so records written after
the checkpoint are dropped.

Before anything is written rank 0 claims ``checkpointing.checkpoint_dir``: a
non-empty directory megatron_dpo did not create is refused, the run marker is
written, and the run lock is taken (a second run on the same directory is
refused, naming the holder; checkpoint/lock.py). The step to continue from is
verified against its manifest; a damaged one is moved aside as
``step_N.corrupt`` and the previous complete step is used (also when loading
fails). Then rank 0 tidies the run dir; nothing complete is ever deleted:
- ``.tmp_*`` leftovers of killed saves are deleted;
- continuing from step N: step dirs newer than N (another timeline, e.g.
  ``resume=<an older step_N>``) move to ``previous_run_<time>/``;
- starting fresh (``resume=never``, or ``auto`` without a complete step dir)
  where an earlier run left step dirs or metrics: its step dirs, metrics,
  summary, plots, config and TensorBoard logs move to ``previous_run_<time>/``.
"""

import hashlib
import json
import logging
import os
import pickle
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

from megatron_dpo.checkpoint.dist import checkpoint_errors, load_policy, saved_optimizer_format
from megatron_dpo.checkpoint.files import CONFIG_FILE, STEP_DIR, policy_dir
from megatron_dpo.checkpoint.load import check_compatible, quarantine, resume_candidates, verify_step
from megatron_dpo.checkpoint.lock import RunLock, acquire_run_lock, check_run_dir, mark_run_dir
from megatron_dpo.checkpoint.manifest import CheckpointCorrupt
from megatron_dpo.checkpoint.rng import load_rng
from megatron_dpo.checkpoint.save import read_train_state, remove_incomplete
from megatron_dpo.checkpoint.source import load_source_weights
from megatron_dpo.config.errors import ConfigError
from megatron_dpo.config.schema import Config
from megatron_dpo.logging.metrics import METRICS_FILE
from megatron_dpo.models.lora import reset_adapters
from megatron_dpo.parallel.dims import ParallelDims

logger = logging.getLogger(__name__)

PREVIOUS_RUN_PREFIX = "previous_run_"
RUN_FILES = (CONFIG_FILE, METRICS_FILE, "metrics.png", "summary.json")


@dataclass
class TrainState:
    """What the loop counts, saved in train_state.json with the sampler and schedule."""

    step: int = 0
    skipped_steps: int = 0
    consecutive_nonfinite: int = 0
    val_history: List[dict] = field(default_factory=list)


def checkpoint_state(dims: ParallelDims, state: TrainState, sampler, fingerprints: Dict[str, str],
                     metrics: Dict[str, float]) -> dict:
    """The train_state.json of a checkpoint (the scheduler is added by save_checkpoint)."""
    return {
        "step": state.step, "epoch": sampler.epoch, "consumed_pairs": sampler.consumed_pairs,
        "skipped_steps": state.skipped_steps, "consecutive_nonfinite": state.consecutive_nonfinite,
        "val_history": state.val_history, "sampler": sampler.state_dict(), "layout": dims.sizes(),
        "fingerprints": fingerprints, "metrics": metrics,
    }


def lora_base(run) -> Optional[dict]:
    """The base a LoRA checkpoint's adapters apply to (its path and a
    fingerprint of its files); None for a full-model run."""
    if not run.cfg.policy.lora_cfg.enabled:
        return None
    source = run.source
    if source.kind == "preset":
        fingerprint = {"preset": source.path, "seed": run.cfg.dpo.seed, "arch": run.arch.to_dict()}
    else:
        root = os.path.abspath(source.path)
        fingerprint = sorted((os.path.relpath(os.path.join(directory, name), root),
                              os.path.getsize(os.path.join(directory, name)))
                             for directory, _, names in os.walk(root) for name in names)
    digest = hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:16]
    return {"path": os.path.abspath(source.path) if source.kind != "preset" else source.path, "fingerprint": digest}


def _check_lora_base(run, directory: str, saved: dict) -> None:
    """Adapters continue only on the base they were trained on (and a full
    checkpoint never continues as LoRA, nor the reverse)."""
    saved_base, base = saved.get("lora_base"), lora_base(run)
    if saved_base == base:
        return
    describe = lambda b: "full-model training" if b is None else f"LoRA on {b['path']} (fingerprint {b['fingerprint']})"  # noqa: E731
    raise ConfigError(
        f"cannot resume from {directory}: it holds {describe(saved_base)}, this run sets up {describe(base)}. "
        "Point policy.model_name (and policy.lora_cfg.enabled) at the checkpoint's base, or use "
        "checkpointing.resume=never to start fresh."
    )


def on_rank0(action: Callable[[], object], dims: ParallelDims):
    """Collective: rank 0 runs ``action``; a ConfigError it raises is raised on
    every rank (the others would otherwise wait forever). Returns rank 0's result."""
    result, message = None, None
    if dims.is_rank0:
        try:
            result = action()
        except ConfigError as error:
            message = str(error)
    shared = [message]
    dist.broadcast_object_list(shared, src=0)
    if shared[0] is not None:
        raise ConfigError(shared[0])
    return result


def claim_run_dir(checkpoint_dir: str) -> RunLock:
    """Rank 0, before anything is written: refuse a user's directory, mark it ours, lock it."""
    check_run_dir(checkpoint_dir)
    mark_run_dir(checkpoint_dir)
    return acquire_run_lock(checkpoint_dir)


def choose_resume_dir(cfg: Config, dims: ParallelDims, below_step: Optional[int] = None) -> Optional[str]:
    """Collective: the newest candidate that passes verification (each rank
    checks its share of the files); damaged ones are moved aside. None: start fresh."""
    for directory in resume_candidates(cfg.checkpointing, below_step):
        problems = [None] * dims.world_size
        dist.all_gather_object(problems, verify_step(directory, cfg.checkpointing.verify, dims.rank,
                                                     dims.world_size))
        problem = next((p for p in problems if p is not None), None)
        if problem is None:
            return directory
        _give_up_on(cfg, directory, problem, dims)
    return None


def _give_up_on(cfg: Config, directory: str, problem: str, dims: ParallelDims) -> None:
    """Collective: a damaged step is moved aside (auto), or refused (an explicit resume path)."""
    if cfg.checkpointing.resume != "auto":
        raise ConfigError(f"checkpointing.resume={directory!r} is damaged: {problem}. Point it at another "
                          "step_N directory, or use checkpointing.resume=auto.")
    if dims.is_rank0:
        quarantine(directory, problem)
    dist.barrier()


def prepare_run_dir(cfg: Config, dims: ParallelDims) -> Tuple[Optional[str], Optional[RunLock]]:
    """Collective: claim the run dir (rank 0 holds the returned lock), choose
    the verified step dir to continue from (None: start fresh), tidy the run dir."""
    lock = on_rank0(lambda: claim_run_dir(cfg.checkpointing.checkpoint_dir), dims)
    directory = choose_resume_dir(cfg, dims)
    dist.barrier()  # every rank has chosen before rank 0 moves anything
    if dims.is_rank0:
        _tidy(cfg, directory)
    dist.barrier()
    return directory, lock


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


def _load_errors():
    """What loading a damaged checkpoint raises once its manifest passed (an
    unverified older step, bytes changed with the manifest, a refused pickle)."""
    return (CheckpointCorrupt, pickle.UnpicklingError, EOFError, KeyError, AssertionError, ValueError,
            *checkpoint_errors())


def _nonfinite_weight(chunks) -> Optional[str]:
    """The first policy parameter holding NaN/inf on this rank, if any."""
    for index, chunk in enumerate(chunks):
        for name, param in chunk.named_parameters():
            if not torch.isfinite(param).all():
                return f"chunk {index} {name}"
    return None


def check_optimizer_layout(directory: str, optimizer_format: str, saved_layout: dict, layout: dict) -> None:
    """dp_reshardable optimizer state follows the saved TP/PP/VPP (its DP
    shards are the gradient buffer's buckets): refuse another model-parallel
    layout before loading anything (MoE: expert layout included)."""
    keys = ("tp", "pp", "vpp", *(k for k in ("ep", "etp") if k in saved_layout or k in layout))
    saved_layout, layout = ({"ep": 1, "etp": 1, **sizes} for sizes in (saved_layout, layout))  # dense: no ep keys
    if optimizer_format == "dp_reshardable" and any(saved_layout.get(k) != layout.get(k) for k in keys):
        raise ConfigError(
            f"cannot resume from {directory} at another model-parallel layout: its optimizer state was saved "
            f"with checkpointing.optimizer_format=dp_reshardable at "
            f"{', '.join(f'{k}={saved_layout.get(k)}' for k in keys)}, this run has "
            f"{', '.join(f'{k}={layout.get(k)}' for k in keys)}. Resume at the saved layout with "
            "checkpointing.optimizer_format=fully_reshardable: its next checkpoint resumes at any layout."
        )


def _load_weights(run, directory: str) -> Optional[str]:
    """Collective: load policy and optimizer state; None, or why the checkpoint
    cannot be used (the same verdict on every rank)."""
    problem = None
    try:
        load_policy(run.policy, run.optimizer, policy_dir(directory))
        bad = _nonfinite_weight(run.policy)
        if bad is not None:
            problem = f"its weights hold NaN/inf ({bad})"
    except ConfigError:
        raise
    except _load_errors() as error:
        problem = f"loading failed: {type(error).__name__}: {str(error)[:500]}"
    verdicts = [None] * run.dims.world_size
    dist.all_gather_object(verdicts, problem)
    return next((v for v in verdicts if v is not None), None)


def restore(run, sampler, fingerprints: Dict[str, str]) -> Tuple[TrainState, Optional[str]]:
    """Collective: load ``run.resume_dir`` into the run (policy weights,
    optimizer, LR schedule, RNG) and the sampler; returns the train state and
    the step dir it came from. The policy's weights are read here only:
    setup_run built it without reading the source. A checkpoint that fails to
    load, or holds NaN/inf weights, is moved aside and the previous complete
    step is used; with none left the run starts fresh from the source."""
    directory = run.resume_dir
    while directory is not None:
        saved = read_train_state(directory)
        check_compatible(directory, saved, run.arch.to_dict(), fingerprints,
                         run.cfg.checkpointing.allow_config_change, run.cfg.policy.precision)
        _check_lora_base(run, directory, saved)
        check_optimizer_layout(directory, saved_optimizer_format(policy_dir(directory)), saved["layout"],
                               run.dims.sizes())
        problem = _load_weights(run, directory)
        if problem is None:
            return _restore_position(run, directory, saved, sampler, fingerprints), directory
        _give_up_on(run.cfg, directory, problem, run.dims)
        directory = choose_resume_dir(run.cfg, run.dims, below_step=saved["step"])
    _start_fresh(run)
    return TrainState(), None


def _start_fresh(run) -> None:
    """Every checkpoint was damaged: the policy reads the source after all."""
    logger.warning("no usable checkpoint in %s: starting fresh from %s", run.cfg.checkpointing.checkpoint_dir,
                   run.source.path)
    if run.cfg.policy.lora_cfg.enabled:  # the base is frozen, as read: only the adapters start over
        reset_adapters(run.policy)
    else:
        load_source_weights(run.policy, run.source, run.dims, run.cfg.dpo.seed)
    run.optimizer.reload_model_params()
    if run.dims.is_rank0:
        _tidy(run.cfg, None)
    dist.barrier()


def _restore_position(run, directory: str, saved: dict, sampler, fingerprints: Dict[str, str]) -> TrainState:
    # The schedule's shape comes from the config; its position from the checkpoint.
    run.scheduler.step(increment=saved["scheduler"]["num_steps"])
    same_data = saved["fingerprints"] == fingerprints
    position = saved["sampler"] if same_data else dict(sampler.state_dict(), consumed_pairs=saved["consumed_pairs"])
    try:
        sampler.load_state_dict(position)
    except ValueError as error:
        raise ConfigError(f"cannot resume from {directory}: {error}") from error
    if saved["layout"] == run.dims.sizes():
        load_rng(directory, run.dims.rank)
    return TrainState(
        step=saved["step"], skipped_steps=saved["skipped_steps"],
        consecutive_nonfinite=saved["consecutive_nonfinite"], val_history=saved["val_history"],
    )
