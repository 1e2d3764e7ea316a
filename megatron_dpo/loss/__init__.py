"""Pure loss math: per-sequence log-probs in, per-pair losses and rewards out.

No torch.distributed here; reduction over pairs is the caller's job.
"""

from megatron_dpo.loss.objective import PairTerms, pair_terms
from megatron_dpo.loss.preference import PreferenceOutput
from megatron_dpo.loss.registry import PREFERENCE_LOSSES, get_preference_loss
from megatron_dpo.loss.sft import sft_loss

__all__ = [
    "PREFERENCE_LOSSES",
    "PairTerms",
    "PreferenceOutput",
    "get_preference_loss",
    "pair_terms",
    "sft_loss",
]
