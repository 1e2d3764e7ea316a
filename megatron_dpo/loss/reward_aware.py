"""Reward-aware preference optimisation (RPO), as in NeMo-Aligner.

Nemotron-4 340B, https://arxiv.org/abs/2406.11704: match the
policy's implied reward gap to a ground-truth one, so that a pair whose
responses are nearly as good is pushed apart less. The ground-truth rewards
come from the data's ``chosen_reward`` / ``rejected_reward`` fields (the
``gt`` argument). Formulas follow NeMo-Aligner's
``MegatronGPTDPOModel.loss_func`` (``preference_loss`` of the same name).

Signature and registration: registry.py; notation (a, b, h, beta):
preference.py. Also:
    g = cfg.gt_reward_scale * (chosen_gt_reward - rejected_gt_reward)
    p_policy = (sigma(beta h), sigma(-beta h))   policy's P(chosen wins), P(rejected wins)
    p_gt     = (sigma(g), sigma(-g))             the same from the ground truth

Shape suffixes: B = number of preference pairs.
"""

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from megatron_dpo.config.schema import LossConfig
from megatron_dpo.loss.registry import GroundTruth, preference_loss

# (log P(chosen wins)_B, log P(rejected wins)_B)
WinLogProbs = Tuple[torch.Tensor, torch.Tensor]


def _scaled_gt_reward_gap(gt: Optional[GroundTruth], cfg: LossConfig) -> torch.Tensor:
    """g = gt_reward_scale * (chosen - rejected); an error if they are missing."""
    if gt is None:
        raise ValueError(
            f"loss_fn.preference_loss={cfg.preference_loss!r} needs ground-truth "
            f"rewards: give every pair numeric 'chosen_reward' and "
            f"'rejected_reward' fields in the data, or pick a loss without them "
            f"(e.g. loss_fn.preference_loss=dpo)."
        )
    return cfg.gt_reward_scale * (gt.chosen_reward_B - gt.rejected_reward_B)


def _log_win_probs(logits_B: torch.Tensor) -> WinLogProbs:
    """(log sigma(x), log sigma(-x)): log P(chosen wins), log P(rejected wins)."""
    return F.logsigmoid(logits_B), F.logsigmoid(-logits_B)


def _binary_kl(p: WinLogProbs, q: WinLogProbs) -> torch.Tensor:
    """KL(p || q) = sum_i p_i (log p_i - log q_i), both given as log-probs."""
    return sum(log_p_B.exp() * (log_p_B - log_q_B) for log_p_B, log_q_B in zip(p, q))


@preference_loss("rpo_sq", needs_gt_rewards=True)
def rpo_sq(a_B: torch.Tensor, b_B: torch.Tensor, cfg: LossConfig,
           gt: Optional[GroundTruth] = None) -> torch.Tensor:
    """Squared distance between the implied and the ground-truth reward gap.

        loss = (beta h - g)^2

    policy == reference: g^2 (0 when the ground-truth rewards are equal).
    """
    gap_B = _scaled_gt_reward_gap(gt, cfg)
    return (cfg.reference_policy_kl_penalty * (a_B - b_B) - gap_B) ** 2


@preference_loss("rpo_fwd_kl", needs_gt_rewards=True)
def rpo_fwd_kl(a_B: torch.Tensor, b_B: torch.Tensor, cfg: LossConfig,
               gt: Optional[GroundTruth] = None) -> torch.Tensor:
    """KL(p_policy || p_gt) between the two win distributions (NeMo-Aligner
    calls this direction forward).

        loss = sum over i in {chosen, rejected} of
               p_policy[i] (log p_policy[i] - log p_gt[i])

    policy == reference: -ln 2 - (log sigma(g) + log sigma(-g)) / 2
    (0 when the ground-truth rewards are equal).
    """
    gap_B = _scaled_gt_reward_gap(gt, cfg)
    policy_win = _log_win_probs(cfg.reference_policy_kl_penalty * (a_B - b_B))
    return _binary_kl(policy_win, _log_win_probs(gap_B))


@preference_loss("rpo_bwd_kl", needs_gt_rewards=True)
def rpo_bwd_kl(a_B: torch.Tensor, b_B: torch.Tensor, cfg: LossConfig,
               gt: Optional[GroundTruth] = None) -> torch.Tensor:
    """KL(p_gt || p_policy) between the two win distributions (NeMo-Aligner
    calls this direction backward).

        loss = sum over i in {chosen, rejected} of
               p_gt[i] (log p_gt[i] - log p_policy[i])

    policy == reference: ln 2 + sigma(g) log sigma(g) + sigma(-g) log sigma(-g)
    (0 when the ground-truth rewards are equal).
    """
    gap_B = _scaled_gt_reward_gap(gt, cfg)
    policy_win = _log_win_probs(cfg.reference_policy_kl_penalty * (a_B - b_B))
    return _binary_kl(_log_win_probs(gap_B), policy_win)
