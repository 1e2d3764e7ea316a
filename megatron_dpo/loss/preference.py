"""Preference losses on the pair's log-ratio margin (the DPO family).

Every preference loss in this package has one signature, so the registry can
swap them:

    fn(policy_chosen_logps_B, policy_rejected_logps_B,
       reference_chosen_logps_B, reference_rejected_logps_B,
       cfg: LossConfig, chosen_gt_reward_B=None, rejected_gt_reward_B=None)
        -> PreferenceOutput(losses_B, chosen_rewards_B, rejected_rewards_B)

The log-probs are per sequence over the completion tokens: summed, or the
per-token mean when the caller length-normalises (see objective.py). Losses
are per pair and unreduced: the caller divides their sum by the global number
of pairs. Rewards are beta * (policy - reference) log-probs, detached (they
are metrics). The ground-truth rewards are used only by the rpo_* losses.

Notation in the docstrings, with beta = cfg.reference_policy_kl_penalty:
    a   = policy_chosen - reference_chosen        chosen log-ratio
    b   = policy_rejected - reference_rejected    rejected log-ratio
    h   = a - b                                   log-ratio margin
    eps = cfg.label_smoothing
    sigma = logistic sigmoid

Formulas follow TRL's ``DPOTrainer.dpo_loss`` (``loss_type`` of the same
name; ``sigmoid`` is our ``dpo``) unless a docstring says otherwise.

Shape suffixes: B = number of preference pairs.
"""

import math
from typing import NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F

from megatron_dpo.config.schema import LossConfig


class PreferenceOutput(NamedTuple):
    losses_B: torch.Tensor
    chosen_rewards_B: torch.Tensor
    rejected_rewards_B: torch.Tensor


def log_ratios(
    policy_chosen_logps_B: torch.Tensor,
    policy_rejected_logps_B: torch.Tensor,
    reference_chosen_logps_B: torch.Tensor,
    reference_rejected_logps_B: torch.Tensor,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(a, b): the chosen and rejected policy/reference log-ratios."""
    return (
        policy_chosen_logps_B - reference_chosen_logps_B,
        policy_rejected_logps_B - reference_rejected_logps_B,
    )


def preference_output(
    losses_B: torch.Tensor,
    chosen_log_ratio_B: torch.Tensor,
    rejected_log_ratio_B: torch.Tensor,
    cfg: LossConfig,
) -> PreferenceOutput:
    """Pairs the losses with the detached rewards beta * a and beta * b."""
    beta = cfg.reference_policy_kl_penalty
    return PreferenceOutput(
        losses_B,
        (beta * chosen_log_ratio_B).detach(),
        (beta * rejected_log_ratio_B).detach(),
    )


def dpo(
    policy_chosen_logps_B, policy_rejected_logps_B,
    reference_chosen_logps_B, reference_rejected_logps_B,
    cfg: LossConfig,
    chosen_gt_reward_B: Optional[torch.Tensor] = None,
    rejected_gt_reward_B: Optional[torch.Tensor] = None,
) -> PreferenceOutput:
    """DPO, https://arxiv.org/abs/2305.18290 (eq. 7); with eps > 0 the
    conservative DPO of https://ericmitchell.ai/cdpo.pdf.

        loss = -(1 - eps) log sigma(beta h) - eps log sigma(-beta h)

    policy == reference: ln 2 (for every eps).
    """
    a_B, b_B = log_ratios(policy_chosen_logps_B, policy_rejected_logps_B,
                          reference_chosen_logps_B, reference_rejected_logps_B)
    logits_B = cfg.reference_policy_kl_penalty * (a_B - b_B)
    eps = cfg.label_smoothing
    losses_B = -(1 - eps) * F.logsigmoid(logits_B) - eps * F.logsigmoid(-logits_B)
    return preference_output(losses_B, a_B, b_B, cfg)


def robust(
    policy_chosen_logps_B, policy_rejected_logps_B,
    reference_chosen_logps_B, reference_rejected_logps_B,
    cfg: LossConfig,
    chosen_gt_reward_B: Optional[torch.Tensor] = None,
    rejected_gt_reward_B: Optional[torch.Tensor] = None,
) -> PreferenceOutput:
    """Robust DPO (unbiased under label noise eps),
    https://arxiv.org/abs/2403.00409.

        loss = (-(1 - eps) log sigma(beta h) + eps log sigma(-beta h)) / (1 - 2 eps)

    Needs 0 <= eps < 0.5. policy == reference: ln 2.
    """
    eps = cfg.label_smoothing
    if not 0.0 <= eps < 0.5:
        raise ValueError(
            f"loss_fn.label_smoothing={eps} but the robust loss divides by "
            f"1 - 2 * label_smoothing: set it in [0, 0.5)."
        )
    a_B, b_B = log_ratios(policy_chosen_logps_B, policy_rejected_logps_B,
                          reference_chosen_logps_B, reference_rejected_logps_B)
    logits_B = cfg.reference_policy_kl_penalty * (a_B - b_B)
    losses_B = (
        -(1 - eps) * F.logsigmoid(logits_B) + eps * F.logsigmoid(-logits_B)
    ) / (1 - 2 * eps)
    return preference_output(losses_B, a_B, b_B, cfg)


def ipo(
    policy_chosen_logps_B, policy_rejected_logps_B,
    reference_chosen_logps_B, reference_rejected_logps_B,
    cfg: LossConfig,
    chosen_gt_reward_B: Optional[torch.Tensor] = None,
    rejected_gt_reward_B: Optional[torch.Tensor] = None,
) -> PreferenceOutput:
    """IPO, https://arxiv.org/abs/2310.12036 (eq. 17; beta is the paper's tau).

        loss = (h - 1 / (2 beta))^2

    Registered twice; the names differ only in the log-probs the objective
    passes in (the formula is the same in TRL and NeMo-Aligner):
      ``ipo``     TRL's ``loss_type="ipo"``: always per-token-mean log-probs,
                  whatever ``preference_average_log_probs`` says.
      ``ipo_sum`` NeMo-Aligner's ``preference_loss: ipo``: the log-probs the
                  flag selects, i.e. per-sequence sums by default.
    Rewards are computed from the same log-probs.
    policy == reference: 1 / (4 beta^2) (25 at beta = 0.1).
    """
    a_B, b_B = log_ratios(policy_chosen_logps_B, policy_rejected_logps_B,
                          reference_chosen_logps_B, reference_rejected_logps_B)
    losses_B = (a_B - b_B - 1 / (2 * cfg.reference_policy_kl_penalty)) ** 2
    return preference_output(losses_B, a_B, b_B, cfg)


def hinge(
    policy_chosen_logps_B, policy_rejected_logps_B,
    reference_chosen_logps_B, reference_rejected_logps_B,
    cfg: LossConfig,
    chosen_gt_reward_B: Optional[torch.Tensor] = None,
    rejected_gt_reward_B: Optional[torch.Tensor] = None,
) -> PreferenceOutput:
    """Hinge loss on the normalised likelihood (SLiC),
    https://arxiv.org/abs/2305.10425, with margin 1.

        loss = max(0, 1 - beta h)

    policy == reference: 1.
    """
    a_B, b_B = log_ratios(policy_chosen_logps_B, policy_rejected_logps_B,
                          reference_chosen_logps_B, reference_rejected_logps_B)
    losses_B = torch.relu(1 - cfg.reference_policy_kl_penalty * (a_B - b_B))
    return preference_output(losses_B, a_B, b_B, cfg)


def exo_pair(
    policy_chosen_logps_B, policy_rejected_logps_B,
    reference_chosen_logps_B, reference_rejected_logps_B,
    cfg: LossConfig,
    chosen_gt_reward_B: Optional[torch.Tensor] = None,
    rejected_gt_reward_B: Optional[torch.Tensor] = None,
) -> PreferenceOutput:
    """EXO, https://arxiv.org/abs/2402.00856 (eq. 16): the reverse KL from
    the label distribution (1 - eps, eps) to sigma(+-beta h).

        loss = sigma(beta h)  (log sigma(beta h)  - log(1 - eps))
             + sigma(-beta h) (log sigma(-beta h) - log eps)

    eps = label_smoothing, or 1e-3 when it is 0 (as TRL).
    policy == reference: -ln 2 - ln(eps (1 - eps)) / 2 (2.761231 at 1e-3).
    """
    eps = cfg.label_smoothing or 1e-3
    a_B, b_B = log_ratios(policy_chosen_logps_B, policy_rejected_logps_B,
                          reference_chosen_logps_B, reference_rejected_logps_B)
    logits_B = cfg.reference_policy_kl_penalty * (a_B - b_B)
    losses_B = (
        torch.sigmoid(logits_B) * (F.logsigmoid(logits_B) - math.log(1 - eps))
        + torch.sigmoid(-logits_B) * (F.logsigmoid(-logits_B) - math.log(eps))
    )
    return preference_output(losses_B, a_B, b_B, cfg)


def discopop(
    policy_chosen_logps_B, policy_rejected_logps_B,
    reference_chosen_logps_B, reference_rejected_logps_B,
    cfg: LossConfig,
    chosen_gt_reward_B: Optional[torch.Tensor] = None,
    rejected_gt_reward_B: Optional[torch.Tensor] = None,
) -> PreferenceOutput:
    """DiscoPOP (log-ratio modulated loss), https://arxiv.org/abs/2406.08414
    (eq. 5), with tau = cfg.discopop_tau and x = beta h:

        m    = sigma(x / tau)
        loss = (1 - m) (-log sigma(x)) + m exp(-x)

    m exp(-x) is computed as exp(log sigma(x / tau) - x), which equals it and
    does not overflow to inf * 0 for very negative x.
    policy == reference: (ln 2 + 1) / 2 = 0.846574.
    """
    a_B, b_B = log_ratios(policy_chosen_logps_B, policy_rejected_logps_B,
                          reference_chosen_logps_B, reference_rejected_logps_B)
    logits_B = cfg.reference_policy_kl_penalty * (a_B - b_B)
    modulation_B = torch.sigmoid(logits_B / cfg.discopop_tau)
    logistic_B = -F.logsigmoid(logits_B)
    modulated_exp_B = torch.exp(F.logsigmoid(logits_B / cfg.discopop_tau) - logits_B)
    losses_B = (1 - modulation_B) * logistic_B + modulated_exp_B
    return preference_output(losses_B, a_B, b_B, cfg)
