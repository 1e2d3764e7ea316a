"""Preference losses on the pair's log-ratio margin (the DPO family).

Every preference loss in this package is a function of the pair's two
log-ratios, registered by name with ``@preference_loss`` (signature and
registration: registry.py):

    fn(a_B, b_B, cfg: LossConfig, gt: Optional[GroundTruth] = None) -> losses_B

The log-ratios are of per-sequence log-probs over the completion tokens:
summed, or the per-token mean when the caller length-normalises (see
objective.py). Losses are per pair and unreduced: the caller divides their sum
by the global number of pairs. The rewards beta * a and beta * b are computed
once for every loss, in objective.py. Only the rpo_* losses read ``gt``.

Notation in the docstrings, with beta = cfg.reference_policy_kl_penalty:
    a   = policy_chosen - reference_chosen        chosen log-ratio (a_B)
    b   = policy_rejected - reference_rejected    rejected log-ratio (b_B)
    h   = a - b                                   log-ratio margin
    eps = cfg.label_smoothing
    sigma = logistic sigmoid

Formulas follow TRL's ``DPOTrainer.dpo_loss`` (``loss_type`` of the same
name; ``sigmoid`` is our ``dpo``) unless a docstring says otherwise.

Shape suffixes: B = number of preference pairs.
"""

import math
from typing import Optional

import torch
import torch.nn.functional as F

from megatron_dpo.config.errors import ConfigError
from megatron_dpo.config.schema import LossConfig
from megatron_dpo.loss.registry import GroundTruth, preference_loss


@preference_loss("dpo")
def dpo(a_B: torch.Tensor, b_B: torch.Tensor, cfg: LossConfig,
        gt: Optional[GroundTruth] = None) -> torch.Tensor:
    """DPO, https://arxiv.org/abs/2305.18290 (eq. 7); with eps > 0 the
    conservative DPO of https://ericmitchell.ai/cdpo.pdf.

        loss = -(1 - eps) log sigma(beta h) - eps log sigma(-beta h)

    policy == reference: ln 2 (for every eps).
    """
    logits_B = cfg.reference_policy_kl_penalty * (a_B - b_B)
    eps = cfg.label_smoothing
    return -(1 - eps) * F.logsigmoid(logits_B) - eps * F.logsigmoid(-logits_B)


def _check_robust_label_smoothing(cfg: LossConfig) -> None:
    eps = cfg.label_smoothing
    if not 0.0 <= eps < 0.5:
        raise ConfigError(
            f"Invalid loss_fn.label_smoothing={eps} for loss_fn.preference_loss='robust': "
            f"the loss divides by 1 - 2 * label_smoothing. Set loss_fn.label_smoothing in [0, 0.5)."
        )


@preference_loss("robust", check_config=_check_robust_label_smoothing)
def robust(a_B: torch.Tensor, b_B: torch.Tensor, cfg: LossConfig,
           gt: Optional[GroundTruth] = None) -> torch.Tensor:
    """Robust DPO (unbiased under label noise eps),
    https://arxiv.org/abs/2403.00409.

        loss = (-(1 - eps) log sigma(beta h) + eps log sigma(-beta h)) / (1 - 2 eps)

    Needs 0 <= eps < 0.5 (checked at startup). policy == reference: ln 2.
    """
    eps = cfg.label_smoothing
    logits_B = cfg.reference_policy_kl_penalty * (a_B - b_B)
    return (
        -(1 - eps) * F.logsigmoid(logits_B) + eps * F.logsigmoid(-logits_B)
    ) / (1 - 2 * eps)


@preference_loss("ipo_sum")  # decorators apply bottom-up: "ipo" registers first
@preference_loss("ipo", length_normalised=True)
def ipo(a_B: torch.Tensor, b_B: torch.Tensor, cfg: LossConfig,
        gt: Optional[GroundTruth] = None) -> torch.Tensor:
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
    return (a_B - b_B - 1 / (2 * cfg.reference_policy_kl_penalty)) ** 2


@preference_loss("hinge")
def hinge(a_B: torch.Tensor, b_B: torch.Tensor, cfg: LossConfig,
          gt: Optional[GroundTruth] = None) -> torch.Tensor:
    """Hinge loss on the normalised likelihood (SLiC),
    https://arxiv.org/abs/2305.10425, with margin 1.

        loss = max(0, 1 - beta h)

    policy == reference: 1.
    """
    return torch.relu(1 - cfg.reference_policy_kl_penalty * (a_B - b_B))


@preference_loss("exo_pair")
def exo_pair(a_B: torch.Tensor, b_B: torch.Tensor, cfg: LossConfig,
             gt: Optional[GroundTruth] = None) -> torch.Tensor:
    """EXO, https://arxiv.org/abs/2402.00856 (eq. 16): the reverse KL from
    the label distribution (1 - eps, eps) to sigma(+-beta h).

        loss = sigma(beta h)  (log sigma(beta h)  - log(1 - eps))
             + sigma(-beta h) (log sigma(-beta h) - log eps)

    eps = label_smoothing, or 1e-3 when it is 0 (as TRL).
    policy == reference: -ln 2 - ln(eps (1 - eps)) / 2 (2.761231 at 1e-3).
    """
    eps = cfg.label_smoothing or 1e-3
    logits_B = cfg.reference_policy_kl_penalty * (a_B - b_B)
    return (
        torch.sigmoid(logits_B) * (F.logsigmoid(logits_B) - math.log(1 - eps))
        + torch.sigmoid(-logits_B) * (F.logsigmoid(-logits_B) - math.log(eps))
    )


@preference_loss("discopop")
def discopop(a_B: torch.Tensor, b_B: torch.Tensor, cfg: LossConfig,
             gt: Optional[GroundTruth] = None) -> torch.Tensor:
    """DiscoPOP (log-ratio modulated loss), https://arxiv.org/abs/2406.08414
    (eq. 5), with tau = cfg.discopop_tau and x = beta h:

        m    = sigma(x / tau)
        loss = (1 - m) (-log sigma(x)) + m exp(-x)

    m exp(-x) is computed as exp(log sigma(x / tau) - x), which equals it and
    does not overflow to inf * 0 for very negative x.
    policy == reference: (ln 2 + 1) / 2 = 0.846574.
    """
    logits_B = cfg.reference_policy_kl_penalty * (a_B - b_B)
    modulation_B = torch.sigmoid(logits_B / cfg.discopop_tau)
    logistic_B = -F.logsigmoid(logits_B)
    modulated_exp_B = torch.exp(F.logsigmoid(logits_B / cfg.discopop_tau) - logits_B)
    return (1 - modulation_B) * logistic_B + modulated_exp_B
