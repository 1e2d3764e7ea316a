"""Preference losses that anchor each response's log-ratio on its own.

DPO-style losses see only the margin h = a - b, so both log-probs may fall
together. These put a target on the chosen and the rejected log-ratio
separately. Signature and registration: registry.py; notation (a, b, h,
beta): preference.py. Formulas follow TRL's ``DPOTrainer.dpo_loss``
(``loss_type`` of the same name).

Shape suffixes: B = number of preference pairs.
"""

from typing import Optional

import torch
import torch.nn.functional as F

from megatron_dpo.config.schema import LossConfig
from megatron_dpo.loss.registry import GroundTruth, preference_loss


@preference_loss("nca_pair")
def nca_pair(a_B: torch.Tensor, b_B: torch.Tensor, cfg: LossConfig,
             gt: Optional[GroundTruth] = None) -> torch.Tensor:
    """NCA for pairwise data, https://arxiv.org/abs/2402.05369.

        loss = -log sigma(beta a) - 0.5 log sigma(-beta a) - 0.5 log sigma(-beta b)

    policy == reference: 2 ln 2.
    """
    beta = cfg.reference_policy_kl_penalty
    return (
        -F.logsigmoid(beta * a_B)
        - 0.5 * F.logsigmoid(-beta * a_B)
        - 0.5 * F.logsigmoid(-beta * b_B)
    )


@preference_loss("bco_pair")
def bco_pair(a_B: torch.Tensor, b_B: torch.Tensor, cfg: LossConfig,
             gt: Optional[GroundTruth] = None) -> torch.Tensor:
    """BCO on pairs, https://arxiv.org/abs/2404.04656: a binary classifier
    with chosen as class 1 and rejected as class 0.

        loss = -log sigma(beta a - delta) - log sigma(-(beta b - delta)),  delta = 0

    TRL shifts by delta = a running mean of past rewards (trainer state kept
    across steps); this pure function has no such state and uses delta = 0.
    policy == reference: 2 ln 2.
    """
    beta = cfg.reference_policy_kl_penalty
    return -F.logsigmoid(beta * a_B) - F.logsigmoid(-beta * b_B)


@preference_loss("sppo_hard")
def sppo_hard(a_B: torch.Tensor, b_B: torch.Tensor, cfg: LossConfig,
              gt: Optional[GroundTruth] = None) -> torch.Tensor:
    """SPPO with hard win probabilities (1 for chosen, 0 for rejected),
    https://arxiv.org/abs/2405.00675 (eq. 4.7).

        loss = (a - 1 / (2 beta))^2 + (b + 1 / (2 beta))^2

    policy == reference: 1 / (2 beta^2) (50 at beta = 0.1).
    """
    half_inv_beta = 0.5 / cfg.reference_policy_kl_penalty
    return (a_B - half_inv_beta) ** 2 + (b_B + half_inv_beta) ** 2


@preference_loss("apo_zero")
def apo_zero(a_B: torch.Tensor, b_B: torch.Tensor, cfg: LossConfig,
             gt: Optional[GroundTruth] = None) -> torch.Tensor:
    """APO-zero, https://arxiv.org/abs/2408.06266 (eq. 7): raise the chosen
    likelihood, lower the rejected one. For chosen outputs better than the
    model's own.

        loss = (1 - sigma(beta a)) + sigma(beta b)

    policy == reference: 1.
    """
    beta = cfg.reference_policy_kl_penalty
    return (1 - torch.sigmoid(beta * a_B)) + torch.sigmoid(beta * b_B)


@preference_loss("apo_down")
def apo_down(a_B: torch.Tensor, b_B: torch.Tensor, cfg: LossConfig,
             gt: Optional[GroundTruth] = None) -> torch.Tensor:
    """APO-down, https://arxiv.org/abs/2408.06266 (eq. 8): lower both
    likelihoods, the rejected one more. For chosen outputs worse than the
    model's own.

        loss = sigma(beta a) + (1 - sigma(beta h))

    policy == reference: 1.
    """
    beta = cfg.reference_policy_kl_penalty
    return torch.sigmoid(beta * a_B) + (1 - torch.sigmoid(beta * (a_B - b_B)))
