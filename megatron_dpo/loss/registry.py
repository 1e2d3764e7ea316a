"""Preference losses by the name ``loss_fn.preference_loss`` gives.

A loss registers itself where it is defined, with a decorator:

    @preference_loss("dpo")
    def dpo(a_B, b_B, cfg, gt=None): ...

so a new variant touches one file: its function and the decorator line. The
variant modules are imported by ``megatron_dpo/loss/__init__.py`` (a new
module goes there). This table is the one list of valid names:
``check_loss_config`` validates the config against it at startup (the config
layer sits below ``loss`` and cannot know the names).

The signature of every preference loss:

    fn(a_B, b_B, cfg: LossConfig, gt: Optional[GroundTruth] = None) -> losses_B

with a_B / b_B the chosen / rejected policy-minus-reference log-ratios (of
summed or per-token-mean log-probs, see objective.py) and losses_B per pair,
unreduced. ``gt`` holds the data's ground-truth rewards; only losses
registered with ``needs_gt_rewards=True`` read it. Rewards are computed once
for every loss, in objective.py.

Shape suffixes: B = number of preference pairs.
"""

import difflib
from dataclasses import dataclass
from typing import Callable, Dict, NamedTuple, Optional

import torch

from megatron_dpo.config.errors import ConfigError
from megatron_dpo.config.schema import LossConfig


class GroundTruth(NamedTuple):
    """The data's rewards of each pair's responses (``chosen_reward`` /
    ``rejected_reward`` fields)."""

    chosen_reward_B: torch.Tensor
    rejected_reward_B: torch.Tensor


PreferenceLoss = Callable[
    [torch.Tensor, torch.Tensor, LossConfig, Optional[GroundTruth]], torch.Tensor
]
# Raises ConfigError when the loss cannot run with this config.
ConfigCheck = Callable[[LossConfig], None]


@dataclass(frozen=True)
class RegisteredLoss:
    name: str
    fn: PreferenceLoss
    # Always fed per-token-mean log-probs, whatever
    # loss_fn.preference_average_log_probs says (TRL's ipo).
    length_normalised: bool
    # Reads the data's ground-truth rewards (the gt argument).
    needs_gt_rewards: bool
    # Cross-field checks that depend on the config only, run at startup.
    check_config: Optional[ConfigCheck]


PREFERENCE_LOSSES: Dict[str, RegisteredLoss] = {}


def preference_loss(
    name: str,
    *,
    length_normalised: bool = False,
    needs_gt_rewards: bool = False,
    check_config: Optional[ConfigCheck] = None,
) -> Callable[[PreferenceLoss], PreferenceLoss]:
    """Registers the decorated function under ``name``; returns it unchanged.
    Stack two decorators to register one formula under two names."""

    def register(fn: PreferenceLoss) -> PreferenceLoss:
        if name in PREFERENCE_LOSSES:
            existing = PREFERENCE_LOSSES[name].fn
            raise ValueError(
                f"preference loss {name!r} is registered twice: by "
                f"{existing.__module__}.{existing.__qualname__} and {fn.__module__}.{fn.__qualname__}"
            )
        PREFERENCE_LOSSES[name] = RegisteredLoss(
            name, fn, length_normalised, needs_gt_rewards, check_config
        )
        return fn

    return register


def get_preference_loss(name: str) -> RegisteredLoss:
    """The registry entry of ``name``; a ConfigError that suggests the nearest
    name if there is none."""
    if name not in PREFERENCE_LOSSES:
        close = difflib.get_close_matches(name, PREFERENCE_LOSSES, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ConfigError(
            f"Invalid value for 'loss_fn.preference_loss': {name!r}.{hint} "
            f"Choose one of: {', '.join(PREFERENCE_LOSSES)}."
        )
    return PREFERENCE_LOSSES[name]


def check_loss_config(loss_cfg: LossConfig) -> None:
    """Startup check of the ``loss_fn`` section against the registry: the loss
    name, then the loss's own cross-field checks. Raises ConfigError."""
    entry = get_preference_loss(loss_cfg.preference_loss)
    if entry.check_config is not None:
        entry.check_config(loss_cfg)
