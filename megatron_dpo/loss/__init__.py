"""Pure loss math: per-sequence log-probs in, per-pair losses and rewards out.

No torch.distributed here; reduction over pairs is the caller's job. The
preference losses register themselves by name (registry.py) when their
modules are imported below; a new variant module is added to that import.
"""

# Importing a variant module registers its losses; this order is the order
# in which the names are listed (in errors, and in PREFERENCE_LOSSES).
from megatron_dpo.loss import preference, anchored, reward_aware  # noqa: F401, I001
from megatron_dpo.loss.objective import PairTerms, PreferenceOutput, pair_terms, preference_terms
from megatron_dpo.loss.registry import (
    PREFERENCE_LOSSES,
    GroundTruth,
    check_loss_config,
    get_preference_loss,
    preference_loss,
)
from megatron_dpo.loss.sft import sft_loss

__all__ = [
    "PREFERENCE_LOSSES",
    "GroundTruth",
    "PairTerms",
    "PreferenceOutput",
    "check_loss_config",
    "get_preference_loss",
    "pair_terms",
    "preference_loss",
    "preference_terms",
    "sft_loss",
]
