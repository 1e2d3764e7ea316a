"""pair_terms: interleaving, length normalisation, SFT weight, worked by hand.

Two pairs, rows interleaved [chosen_0, rejected_0, chosen_1, rejected_1],
beta = 0.1:
                 policy  reference  tokens
    chosen_0      -4.0     -6.0        2
    rejected_0    -9.0     -6.0        3
    chosen_1      -5.0     -5.0        5     (pair 1: policy == reference)
    rejected_1    -7.0     -7.0        7
Summed log-probs, pair 0: a = -4 + 6 = 2, b = -9 + 6 = -3, h = 5, beta h = 0.5
    dpo = -log sigma(0.5) = 0.474077; rewards 0.1 * 2 = 0.2, 0.1 * -3 = -0.3
Per-token means, pair 0: policy -4/2 = -2 vs reference -6/2 = -3 -> a = 1;
    policy -9/3 = -3 vs reference -6/3 = -2 -> b = -1; h = 2, beta h = 0.2
    dpo = -log sigma(0.2) = 0.598139; rewards 0.1, -0.1
Pair 1 in both forms: dpo = ln 2 = 0.693147, rewards 0.
SFT on chosen: summed 4.0 and 5.0; per token 4/2 = 2.0 and 5/5 = 1.0.
"""

import math

import pytest
import torch
from torch.testing import assert_close

from megatron_dpo.config.schema import LossConfig
from megatron_dpo.loss import pair_terms

LN2 = math.log(2)


def _inputs(requires_grad=False):
    policy_logps_2B = torch.tensor([-4.0, -9.0, -5.0, -7.0], requires_grad=requires_grad)
    reference_logps_2B = torch.tensor([-6.0, -6.0, -5.0, -7.0])
    num_tokens_2B = torch.tensor([2, 3, 5, 7])
    return policy_logps_2B, reference_logps_2B, num_tokens_2B


def _cfg(**fields):
    return LossConfig(reference_policy_kl_penalty=0.1, **fields)


@pytest.mark.parametrize(
    "preference_average, sft_average, preference_B, sft_B, chosen_reward_B, rejected_reward_B",
    [
        (False, False, [0.474077, LN2], [4.0, 5.0], [0.2, 0.0], [-0.3, 0.0]),
        (True, False, [0.598139, LN2], [4.0, 5.0], [0.1, 0.0], [-0.1, 0.0]),
        (False, True, [0.474077, LN2], [2.0, 1.0], [0.2, 0.0], [-0.3, 0.0]),
        (True, True, [0.598139, LN2], [2.0, 1.0], [0.1, 0.0], [-0.1, 0.0]),
    ],
)
def test_averaging_flags(preference_average, sft_average, preference_B, sft_B,
                         chosen_reward_B, rejected_reward_B):
    """loss = 1.0 * preference + 0.5 * sft, e.g. both flags on, pair 0:
    0.598139 + 0.5 * 2.0 = 1.598139."""
    cfg = _cfg(preference_average_log_probs=preference_average,
               sft_average_log_probs=sft_average, sft_loss_weight=0.5)
    terms = pair_terms(*_inputs(), cfg)
    assert_close(terms.preference_loss, torch.tensor(preference_B), atol=1e-6, rtol=0)
    assert_close(terms.sft_loss, torch.tensor(sft_B))
    assert_close(terms.loss, torch.tensor(preference_B) + 0.5 * torch.tensor(sft_B),
                 atol=1e-6, rtol=0)
    assert_close(terms.chosen_reward, torch.tensor(chosen_reward_B))
    assert_close(terms.rejected_reward, torch.tensor(rejected_reward_B))
    # Metrics: summed policy log-probs whatever the flags.
    assert_close(terms.chosen_logps, torch.tensor([-4.0, -5.0]))
    assert_close(terms.rejected_logps, torch.tensor([-9.0, -7.0]))


def test_weights():
    """preference weight 2, sft weight 0.25 (sums): pair 0 = 2 * 0.474077 + 0.25 * 4."""
    terms = pair_terms(*_inputs(), _cfg(preference_loss_weight=2.0, sft_loss_weight=0.25))
    assert_close(terms.loss, torch.tensor([1.948154, 2 * LN2 + 1.25]), atol=1e-6, rtol=0)


def test_sft_weight_zero_still_reports_sft_loss():
    terms = pair_terms(*_inputs(), _cfg())
    assert_close(terms.loss, terms.preference_loss)
    assert_close(terms.sft_loss, torch.tensor([4.0, 5.0]))


def test_ipo_is_always_length_normalised_and_ipo_sum_follows_the_flag():
    """Flag off. ipo: per-token h = 2 -> (2 - 5)^2 = 9; ipo_sum: summed h = 5
    -> (5 - 5)^2 = 0. Pair 1: h = 0 -> 25 for both."""
    ipo = pair_terms(*_inputs(), _cfg(preference_loss="ipo"))
    ipo_sum = pair_terms(*_inputs(), _cfg(preference_loss="ipo_sum"))
    assert_close(ipo.preference_loss, torch.tensor([9.0, 25.0]))
    assert_close(ipo.chosen_reward, torch.tensor([0.1, 0.0]))
    assert_close(ipo_sum.preference_loss, torch.tensor([0.0, 25.0]))
    assert_close(ipo_sum.chosen_reward, torch.tensor([0.2, 0.0]))
    ipo_sum_averaged = pair_terms(
        *_inputs(), _cfg(preference_loss="ipo_sum", preference_average_log_probs=True))
    assert_close(ipo_sum_averaged.preference_loss, ipo.preference_loss)


def test_gt_rewards_are_split_like_the_log_probs():
    """gt [1.0, 0.5, 2.0, 2.0], scale 2 -> g = [1, 0].
    rpo_sq (summed): pair 0 (0.5 - 1)^2 = 0.25, pair 1 (0 - 0)^2 = 0."""
    gt_rewards_2B = torch.tensor([1.0, 0.5, 2.0, 2.0])
    terms = pair_terms(*_inputs(), _cfg(preference_loss="rpo_sq", gt_reward_scale=2.0),
                       gt_rewards_2B)
    assert_close(terms.preference_loss, torch.tensor([0.25, 0.0]))


def test_missing_gt_rewards_is_an_error():
    with pytest.raises(ValueError, match="chosen_reward"):
        pair_terms(*_inputs(), _cfg(preference_loss="rpo_fwd_kl"))


def test_gradient_flows_through_loss_only():
    """Summed form, sft weight 0.5. d loss / d chosen_0 =
    -beta sigma(-0.5) - 0.5 = -0.1 * 0.377541 - 0.5 = -0.537754;
    d loss / d rejected_0 = +0.037754. Pair 1: -0.05 - 0.5 and +0.05."""
    policy_logps_2B, reference_logps_2B, num_tokens_2B = _inputs(requires_grad=True)
    terms = pair_terms(policy_logps_2B, reference_logps_2B, num_tokens_2B,
                       _cfg(sft_loss_weight=0.5))
    terms.loss.sum().backward()
    assert_close(policy_logps_2B.grad, torch.tensor([-0.537754, 0.037754, -0.55, 0.05]),
                 atol=1e-6, rtol=0)
    for name in ("preference_loss", "sft_loss", "chosen_reward", "rejected_reward",
                 "chosen_logps", "rejected_logps"):
        assert not getattr(terms, name).requires_grad, name


def test_empty_completion_averages_to_zero_not_nan():
    """A sequence with no completion tokens has summed logps 0; 0 / max(0, 1) = 0."""
    terms = pair_terms(torch.zeros(2), torch.zeros(2), torch.tensor([0, 0]),
                       _cfg(preference_average_log_probs=True, sft_average_log_probs=True))
    assert_close(terms.preference_loss, torch.tensor([LN2]))
    assert_close(terms.sft_loss, torch.tensor([0.0]))


def test_low_precision_inputs_give_fp32_terms():
    policy_logps_2B, reference_logps_2B, num_tokens_2B = _inputs()
    terms = pair_terms(policy_logps_2B.bfloat16(), reference_logps_2B.bfloat16(),
                       num_tokens_2B, _cfg())
    assert terms.loss.dtype == torch.float32
    assert_close(terms.preference_loss, torch.tensor([0.474077, LN2]), atol=1e-6, rtol=0)
