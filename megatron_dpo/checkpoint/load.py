"""Which checkpoint a run continues from, whether it is intact, and whether it may.

Candidates are the complete step directories, newest first. Each is checked
against its manifest (``checkpointing.verify``) before it is trusted; one that
fails is moved aside as ``step_N.corrupt`` with a warning, and the previous
one is tried, so a damaged newest checkpoint never becomes a crash loop under
``--requeue``. Every read goes through dist_checkpointing (policy and
optimizer; its metadata through the restricted unpickler of
parallel/compat.py), ``torch.load(weights_only=True)`` (RNG tensors) or JSON /
YAML: nothing in a checkpoint directory can run code.
"""

import json
import logging
import os
from typing import Dict, List, Optional

import yaml

from megatron_dpo.checkpoint.files import (
    ARCH_FILE, CONFIG_FILE, CORRUPT_SUFFIX, MANIFEST_FILE, is_complete, step_dir,
)
from megatron_dpo.checkpoint.fingerprint import arch_differences
from megatron_dpo.checkpoint.manifest import CheckpointCorrupt, verify_manifest
from megatron_dpo.checkpoint.save import complete_steps
from megatron_dpo.config.errors import ConfigError
from megatron_dpo.config.schema import CheckpointingConfig

logger = logging.getLogger(__name__)


def resume_candidates(cfg: CheckpointingConfig, below_step: Optional[int] = None) -> List[str]:
    """The step directories a run may continue from, best first (the newest
    complete one, or ``resume``'s path); [] to start fresh. ``below_step``:
    only older steps (the fallback after a step failed to load)."""
    if not cfg.enabled or cfg.resume == "never":
        return []
    if cfg.resume == "auto":
        steps = [s for s in complete_steps(cfg.checkpoint_dir) if below_step is None or s < below_step]
        return [step_dir(cfg.checkpoint_dir, s) for s in reversed(steps)]
    if below_step is not None:
        return []
    if not is_complete(cfg.resume):
        raise ConfigError(
            f"checkpointing.resume={cfg.resume!r} is not a complete checkpoint (a step_N directory with "
            "train_state.json). Point it at one, or use auto (newest in checkpointing.checkpoint_dir) or never."
        )
    return [cfg.resume]


def verify_step(directory: str, mode: str, rank: int, world_size: int) -> Optional[str]:
    """This rank's verdict on its share of ``directory``'s files: None when
    intact, else what is wrong (the file and the problem). A step written
    before manifests existed is accepted unchecked, with a warning."""
    if not os.path.exists(os.path.join(directory, MANIFEST_FILE)):
        if rank == 0:
            logger.warning("%s has no %s (written by an older megatron_dpo): loading it unverified",
                           directory, MANIFEST_FILE)
        return None
    try:
        verify_manifest(directory, mode, rank=rank, world_size=world_size)
    except CheckpointCorrupt as error:
        return str(error)
    return None


def quarantine(directory: str, problem: str) -> str:
    """Move a damaged step directory aside as ``step_N.corrupt`` (nothing is
    deleted) and say so; returns the new path. Rank 0 only."""
    target = directory.rstrip(os.sep) + CORRUPT_SUFFIX
    suffix = 1
    while os.path.exists(target):
        target = f"{directory.rstrip(os.sep)}{CORRUPT_SUFFIX}.{suffix}"
        suffix += 1
    os.replace(directory, target)
    logger.warning("checkpoint %s is damaged (%s): moved it to %s; continuing from the previous complete step",
                   directory, problem, target)
    return target


def saved_precision(directory: str) -> Optional[str]:
    """policy.precision of the run that wrote ``directory`` (its config.yaml), if recorded."""
    try:
        with open(os.path.join(directory, CONFIG_FILE)) as handle:
            return yaml.safe_load(handle)["policy"]["precision"]
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        return None


def check_compatible(directory: str, train_state: dict, arch: Dict[str, object], fingerprints: Dict[str, str],
                     allow_config_change: bool, precision: Optional[str] = None) -> None:
    """Refuse to continue a checkpoint of another model, precision, tokenizer or training set."""
    saved = saved_precision(directory)
    if precision is not None and saved is not None and saved != precision:
        raise ConfigError(
            f"cannot resume from {directory}: it was trained with policy.precision={saved}, this run sets "
            f"policy.precision={precision}, and the optimizer state (fp32 main weights and Adam moments "
            f"of a {saved} model) does not carry over. Set policy.precision={saved} to continue, or start a new "
            f"run from its weights (cast to {precision}) with policy.model_name={directory} "
            "checkpointing.resume=never in another checkpointing.checkpoint_dir."
        )
    with open(os.path.join(directory, ARCH_FILE)) as handle:
        arch_diff = arch_differences(json.load(handle), arch)
    if arch_diff:
        raise ConfigError(
            f"cannot resume from {directory}: its model architecture differs from policy.model_name's "
            f"({'; '.join(arch_diff)}). Use another checkpointing.checkpoint_dir, or "
            "checkpointing.resume=never to start fresh."
        )
    saved = train_state["fingerprints"]
    differing = [name for name in sorted(fingerprints) if saved.get(name) != fingerprints[name]]
    if differing and not allow_config_change:
        raise ConfigError(
            f"cannot resume from {directory}: the {' and the '.join(_describe(differing))} differ from the "
            "checkpoint's. Restore the original settings, set checkpointing.allow_config_change=true to "
            "continue on purpose, or use checkpointing.resume=never to start fresh."
        )


def _describe(names: List[str]) -> List[str]:
    what = {
        "tokenizer": "tokenizer (policy.tokenizer.*)",
        "data": "training data (data.train_data_path, its keys, policy.max_total_sequence_length, "
                "data.overlength_policy)",
    }
    return [what[name] for name in names]
