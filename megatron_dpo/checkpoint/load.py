"""Which checkpoint a run continues from, and whether it may.

Every read goes through dist_checkpointing (policy and optimizer),
``torch.load(weights_only=True)`` (RNG tensors) or JSON: nothing in a
checkpoint directory can run code.
"""

import json
import os
from typing import Dict, List, Optional

from megatron_dpo.checkpoint.fingerprint import arch_differences
from megatron_dpo.checkpoint.save import is_complete, latest_step, step_dir
from megatron_dpo.config.errors import ConfigError
from megatron_dpo.config.schema import CheckpointingConfig
from megatron_dpo.models.source import ARCH_FILE


def find_resume_dir(cfg: CheckpointingConfig) -> Optional[str]:
    """The step directory to continue from, or None to start fresh."""
    if not cfg.enabled or cfg.resume == "never":
        return None
    if cfg.resume == "auto":
        step = latest_step(cfg.checkpoint_dir)
        return None if step is None else step_dir(cfg.checkpoint_dir, step)
    if not is_complete(cfg.resume):
        raise ConfigError(
            f"checkpointing.resume={cfg.resume!r} is not a complete checkpoint (a step_N directory with "
            "train_state.json). Point it at one, or use auto (newest in checkpointing.checkpoint_dir) or never."
        )
    return cfg.resume


def check_compatible(directory: str, train_state: dict, arch: Dict[str, object], fingerprints: Dict[str, str],
                     allow_config_change: bool) -> None:
    """Refuse to continue a checkpoint of another model, tokenizer or training set."""
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
