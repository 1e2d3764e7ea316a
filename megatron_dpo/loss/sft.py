"""The SFT (negative log-likelihood) term on the chosen responses.

Shape suffixes: B = number of preference pairs.
"""

import torch


def sft_loss(policy_chosen_logps_B: torch.Tensor) -> torch.Tensor:
    """loss = -log pi(chosen | prompt), per pair, unreduced.

    The caller passes summed log-probs (per-sequence NLL) or per-token means
    (``loss_fn.sft_average_log_probs``: per-token NLL).
    """
    return -policy_chosen_logps_B
