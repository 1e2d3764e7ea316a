"""The per-pair DPO objective: the interface the training schedule calls.

Input rows are sequences with the pairs interleaved,
[chosen_0, rejected_0, chosen_1, rejected_1, ...] (a micro-batch holds whole
pairs). Each row's value is the policy's (or reference's) log-prob of the
completion, summed over its tokens; ``num_tokens`` is the completion's token
count. The result is per pair and unreduced: the caller sums it over its pairs
and divides by the GLOBAL number of pairs of the step (see DESIGN.md,
Normalisation), so the same code serves every DP / micro-batch layout.

The registered preference loss (registry.py) sees only the two log-ratios;
the rewards beta * a, beta * b are computed here, once for every loss.

Shape suffixes: B = number of pairs, 2B = number of sequences (2 per pair).
"""

from dataclasses import dataclass
from typing import NamedTuple, Optional, Tuple

import torch

from megatron_dpo.config.schema import LossConfig
from megatron_dpo.loss.registry import GroundTruth, get_preference_loss
from megatron_dpo.loss.sft import sft_loss


@dataclass
class PairTerms:
    """Per-pair terms, every field of shape [B].

    Only ``loss`` carries the autograd graph; the rest are detached metrics.
    """

    # preference_loss_weight * preference_loss + sft_loss_weight * sft_loss
    loss: torch.Tensor
    preference_loss: torch.Tensor
    sft_loss: torch.Tensor
    # beta * (policy - reference) log-probs, on the log-probs the preference
    # loss saw (per-token means when length-normalised).
    chosen_reward: torch.Tensor
    rejected_reward: torch.Tensor
    # Summed policy log-probs of the sequences.
    chosen_logps: torch.Tensor
    rejected_logps: torch.Tensor


def _split_pairs(values_2B: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """[c0, r0, c1, r1, ...] -> ([c0, c1, ...], [r0, r1, ...])."""
    return values_2B[0::2], values_2B[1::2]


class PreferenceOutput(NamedTuple):
    losses_B: torch.Tensor
    # beta * a and beta * b, detached (metrics).
    chosen_rewards_B: torch.Tensor
    rejected_rewards_B: torch.Tensor


def preference_terms(
    chosen_log_ratio_B: torch.Tensor,
    rejected_log_ratio_B: torch.Tensor,
    cfg: LossConfig,
    gt: Optional[GroundTruth] = None,
) -> PreferenceOutput:
    """The preference loss ``cfg.preference_loss`` of each pair and the
    rewards, from the policy-minus-reference log-ratios a and b."""
    loss_fn = get_preference_loss(cfg.preference_loss).fn
    beta = cfg.reference_policy_kl_penalty
    return PreferenceOutput(
        loss_fn(chosen_log_ratio_B, rejected_log_ratio_B, cfg, gt),
        (beta * chosen_log_ratio_B).detach(),
        (beta * rejected_log_ratio_B).detach(),
    )


def pair_terms(
    policy_logps_2B: torch.Tensor,
    reference_logps_2B: torch.Tensor,
    num_tokens_2B: torch.Tensor,
    cfg: LossConfig,
    gt_rewards_2B: Optional[torch.Tensor] = None,
) -> PairTerms:
    """The loss terms of each pair from per-sequence summed log-probs.

    Args:
        policy_logps_2B: summed completion log-probs of the policy (with grad).
        reference_logps_2B: the same for the frozen reference.
        num_tokens_2B: completion token count of each sequence.
        cfg: the ``loss_fn`` config.
        gt_rewards_2B: ground-truth reward of each sequence (rpo_* losses).

    With ``cfg.preference_average_log_probs`` (always for a loss registered
    with ``length_normalised=True``, e.g. ``ipo``) the preference loss and the
    rewards use log-probs / num_tokens; with ``cfg.sft_average_log_probs`` the
    SFT term does. Computed in fp32.
    """
    assert policy_logps_2B.dim() == 1 and policy_logps_2B.shape[0] % 2 == 0, (
        f"expected [2B] interleaved chosen/rejected rows, got {tuple(policy_logps_2B.shape)}"
    )
    assert reference_logps_2B.shape == policy_logps_2B.shape == num_tokens_2B.shape, (
        f"shape mismatch: policy {tuple(policy_logps_2B.shape)}, reference "
        f"{tuple(reference_logps_2B.shape)}, num_tokens {tuple(num_tokens_2B.shape)}"
    )
    always_length_normalised = get_preference_loss(cfg.preference_loss).length_normalised
    policy_logps_2B = policy_logps_2B.float()
    reference_logps_2B = reference_logps_2B.float()
    # clamp: a sequence without completion tokens has logps 0, and stays 0.
    num_tokens_2B = num_tokens_2B.float().clamp(min=1)

    if cfg.preference_average_log_probs or always_length_normalised:
        policy_preference_2B = policy_logps_2B / num_tokens_2B
        reference_preference_2B = reference_logps_2B / num_tokens_2B
    else:
        policy_preference_2B, reference_preference_2B = policy_logps_2B, reference_logps_2B
    gt = None if gt_rewards_2B is None else GroundTruth(*_split_pairs(gt_rewards_2B.float()))
    preference = preference_terms(
        *_split_pairs(policy_preference_2B - reference_preference_2B), cfg, gt
    )

    sft_logps_2B = policy_logps_2B / num_tokens_2B if cfg.sft_average_log_probs else policy_logps_2B
    sft_losses_B = sft_loss(_split_pairs(sft_logps_2B)[0])

    chosen_logps_B, rejected_logps_B = _split_pairs(policy_logps_2B.detach())
    return PairTerms(
        loss=cfg.preference_loss_weight * preference.losses_B
        + cfg.sft_loss_weight * sft_losses_B,
        preference_loss=preference.losses_B.detach(),
        sft_loss=sft_losses_B.detach(),
        chosen_reward=preference.chosen_rewards_B,
        rejected_reward=preference.rejected_rewards_B,
        chosen_logps=chosen_logps_B,
        rejected_logps=rejected_logps_B,
    )
