"""Preference losses by the name ``loss_fn.preference_loss`` gives.

A new variant is a new function (see preference.py for the signature) plus
one entry here and its name in ``CHOICES["loss_fn.preference_loss"]``
(config/schema.py).
"""

import difflib
from typing import Callable, Dict

from megatron_dpo.loss import anchored, preference, reward_aware
from megatron_dpo.loss.preference import PreferenceOutput

PreferenceLoss = Callable[..., PreferenceOutput]

PREFERENCE_LOSSES: Dict[str, PreferenceLoss] = {
    "dpo": preference.dpo,
    "robust": preference.robust,
    "ipo": preference.ipo,
    "ipo_sum": preference.ipo,
    "hinge": preference.hinge,
    "exo_pair": preference.exo_pair,
    "discopop": preference.discopop,
    "nca_pair": anchored.nca_pair,
    "bco_pair": anchored.bco_pair,
    "sppo_hard": anchored.sppo_hard,
    "apo_zero": anchored.apo_zero,
    "apo_down": anchored.apo_down,
    "rpo_sq": reward_aware.rpo_sq,
    "rpo_fwd_kl": reward_aware.rpo_fwd_kl,
    "rpo_bwd_kl": reward_aware.rpo_bwd_kl,
}

# Losses that always see per-token-mean log-probs, whatever
# loss_fn.preference_average_log_probs says (TRL's ipo; see preference.ipo).
ALWAYS_LENGTH_NORMALISED = frozenset({"ipo"})

# Losses that need the data's ground-truth rewards (chosen_reward / rejected_reward).
NEEDS_GT_REWARDS = frozenset({"rpo_sq", "rpo_fwd_kl", "rpo_bwd_kl"})


def get_preference_loss(name: str) -> PreferenceLoss:
    if name not in PREFERENCE_LOSSES:
        close = difflib.get_close_matches(name, PREFERENCE_LOSSES, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(
            f"loss_fn.preference_loss={name!r} is not a known preference loss."
            f"{hint} Valid names: {', '.join(PREFERENCE_LOSSES)}."
        )
    return PREFERENCE_LOSSES[name]
