"""Preference losses checked against numbers worked out by hand.

One pair serves every hand-worked example, with beta = 0.1:
    policy chosen   -1.0, reference chosen   -2.0  ->  a = +1.0
    policy rejected -3.0, reference rejected -2.0  ->  b = -1.0
    h = a - b = 2.0, beta h = 0.2, beta a = 0.1, beta b = -0.1
    rewards: chosen 0.1 * 1.0 = 0.1, rejected 0.1 * -1.0 = -0.1
Values used below (sigma = logistic, 6 decimals):
    sigma(0.2)  = 0.549834   log sigma(0.2)  = -0.598139
    sigma(-0.2) = 0.450166   log sigma(-0.2) = -0.798139
    sigma(0.1)  = 0.524979   log sigma(0.1)  = -0.644397
    sigma(-0.1) = 0.475021   log sigma(-0.1) = -0.744397
    (log sigma(x) - log sigma(-x) = x throughout.)
"""

import math

import pytest
import torch
from torch.testing import assert_close

from megatron_dpo.config import CHOICES, ConfigError, load_config
from megatron_dpo.config.schema import LossConfig
from megatron_dpo.loss import pair_terms, preference_terms
from megatron_dpo.loss.registry import (
    PREFERENCE_LOSSES,
    GroundTruth,
    check_loss_config,
    get_preference_loss,
    preference_loss,
)

LN2 = math.log(2)


def _pair():
    """The worked pair: (policy chosen, policy rejected, ref chosen, ref rejected)."""
    return (torch.tensor([-1.0]), torch.tensor([-3.0]),
            torch.tensor([-2.0]), torch.tensor([-2.0]))


def _terms(cfg, policy_chosen_B, policy_rejected_B, reference_chosen_B, reference_rejected_B,
           gt=None):
    """Loss and rewards of cfg.preference_loss from the four per-sequence log-probs."""
    return preference_terms(policy_chosen_B - reference_chosen_B,
                            policy_rejected_B - reference_rejected_B, cfg, gt)


def _loss(name, gt=None, **cfg_fields):
    cfg = LossConfig(reference_policy_kl_penalty=0.1, preference_loss=name, **cfg_fields)
    return _terms(cfg, *_pair(), gt)


# name, LossConfig fields, expected loss (arithmetic in the comment).
WORKED_EXAMPLES = [
    # -log sigma(0.2)
    ("dpo", {}, 0.598139),
    # 0.9 * 0.598139 + 0.1 * 0.798139 = 0.538325 + 0.079814
    ("dpo", {"label_smoothing": 0.1}, 0.618139),
    # (0.9 * 0.598139 - 0.1 * 0.798139) / (1 - 0.2) = 0.458511 / 0.8
    ("robust", {"label_smoothing": 0.1}, 0.573139),
    # (h - 1 / (2 * 0.1))^2 = (2 - 5)^2
    ("ipo", {}, 9.0),
    ("ipo_sum", {}, 9.0),
    # max(0, 1 - 0.2)
    ("hinge", {}, 0.8),
    # eps = 1e-3: 0.549834 * (-0.598139 - log 0.999) + 0.450166 * (-0.798139 - log 0.001)
    #   = 0.549834 * (-0.597139) + 0.450166 * 6.109616 = -0.328327 + 2.750342
    ("exo_pair", {}, 2.422015),
    # eps = 0.1: 0.549834 * (-0.598139 + 0.105361) + 0.450166 * (-0.798139 + 2.302585)
    ("exo_pair", {"label_smoothing": 0.1}, 0.406304),
    # m = sigma(0.2 / 0.05) = sigma(4) = 0.982014
    # (1 - m) * 0.598139 + m * exp(-0.2) = 0.010758 + 0.982014 * 0.818731
    ("discopop", {}, 0.814763),
    # -log sigma(0.1) - 0.5 log sigma(-0.1) - 0.5 log sigma(0.1)
    #   = 0.644397 + 0.372198 + 0.322198
    ("nca_pair", {}, 1.338793),
    # -log sigma(0.1) - log sigma(0.1) = 2 * 0.644397
    ("bco_pair", {}, 1.288793),
    # (1 - 5)^2 + (-1 + 5)^2 = 16 + 16
    ("sppo_hard", {}, 32.0),
    # (1 - sigma(0.1)) + sigma(-0.1) = 0.475021 + 0.475021
    ("apo_zero", {}, 0.950042),
    # sigma(0.1) + (1 - sigma(0.2)) = 0.524979 + 0.450166
    ("apo_down", {}, 0.975145),
]


@pytest.mark.parametrize("name, fields, expected", WORKED_EXAMPLES)
def test_worked_example(name, fields, expected):
    out = _loss(name, **fields)
    assert_close(out.losses_B, torch.tensor([expected]), atol=2e-6, rtol=0)
    assert_close(out.chosen_rewards_B, torch.tensor([0.1]))
    assert_close(out.rejected_rewards_B, torch.tensor([-0.1]))


# Ground truth: chosen 1.0, rejected 0.5, gt_reward_scale 2 -> g = 2 * 0.5 = 1.0.
# sigma(1) = 0.731059, log sigma(1) = -0.313262, log sigma(-1) = -1.313262.
RPO_WORKED_EXAMPLES = [
    # (beta h - g)^2 = (0.2 - 1)^2
    ("rpo_sq", 0.64),
    # KL(policy || gt) = sigma(0.2) (log sigma(0.2) - log sigma(1))
    #                  + sigma(-0.2) (log sigma(-0.2) - log sigma(-1))
    #   = 0.549834 * -0.284877 + 0.450166 * 0.515123 = -0.156635 + 0.231891
    ("rpo_fwd_kl", 0.075256),
    # KL(gt || policy) = 0.731059 * 0.284877 + 0.268941 * -0.515123
    #   = 0.208262 - 0.138538
    ("rpo_bwd_kl", 0.069724),
]


@pytest.mark.parametrize("name, expected", RPO_WORKED_EXAMPLES)
def test_reward_aware_worked_example(name, expected):
    out = _loss(name, gt=GroundTruth(torch.tensor([1.0]), torch.tensor([0.5])), gt_reward_scale=2.0)
    assert_close(out.losses_B, torch.tensor([expected]), atol=2e-6, rtol=0)
    assert_close(out.chosen_rewards_B, torch.tensor([0.1]))


# Loss when policy == reference (h = a = b = 0), beta = 0.1, default config,
# equal ground-truth rewards (g = 0).
AT_REFERENCE = {
    "dpo": LN2,                          # -log sigma(0)
    "robust": LN2,
    "ipo": 25.0,                         # (1 / (2 beta))^2 = 5^2
    "ipo_sum": 25.0,
    "hinge": 1.0,
    "exo_pair": -LN2 - 0.5 * math.log(1e-3 * (1 - 1e-3)),  # 2.761231
    "discopop": (LN2 + 1) / 2,           # m = 1/2: (ln 2 + exp 0) / 2 = 0.846574
    "nca_pair": 2 * LN2,
    "bco_pair": 2 * LN2,
    "sppo_hard": 50.0,                   # 5^2 + 5^2
    "apo_zero": 1.0,                     # 1/2 + 1/2
    "apo_down": 1.0,
    "rpo_sq": 0.0,
    "rpo_fwd_kl": 0.0,
    "rpo_bwd_kl": 0.0,
}


def test_every_registered_loss_has_a_constant_at_reference():
    assert set(AT_REFERENCE) == set(PREFERENCE_LOSSES)


@pytest.mark.parametrize("name", sorted(AT_REFERENCE))
def test_loss_at_reference(name):
    logps_B = torch.tensor([-5.0, -12.5, -0.25])
    gt_B = torch.tensor([0.3, -1.0, 2.0])
    cfg = LossConfig(reference_policy_kl_penalty=0.1, preference_loss=name)
    out = _terms(cfg, logps_B, logps_B - 1, logps_B, logps_B - 1, GroundTruth(gt_B, gt_B))
    assert_close(out.losses_B, torch.full((3,), AT_REFERENCE[name]))
    assert_close(out.chosen_rewards_B, torch.zeros(3))
    assert_close(out.rejected_rewards_B, torch.zeros(3))


# At policy == reference with g = 1 (see RPO_WORKED_EXAMPLES for the sigmas):
RPO_AT_REFERENCE_WITH_GAP = {
    "rpo_sq": 1.0,                                  # g^2
    "rpo_fwd_kl": -LN2 + (0.313262 + 1.313262) / 2,  # 0.120115
    "rpo_bwd_kl": LN2 - 0.731059 * 0.313262 - 0.268941 * 1.313262,  # 0.110944
}


@pytest.mark.parametrize("name", sorted(RPO_AT_REFERENCE_WITH_GAP))
def test_reward_aware_at_reference_with_gt_gap(name):
    logps_B = torch.tensor([-4.0])
    cfg = LossConfig(reference_policy_kl_penalty=0.1, preference_loss=name)
    out = _terms(cfg, logps_B, logps_B, logps_B, logps_B,
                 GroundTruth(torch.tensor([1.5]), torch.tensor([0.5])))
    assert_close(out.losses_B, torch.tensor([RPO_AT_REFERENCE_WITH_GAP[name]]),
                 atol=2e-6, rtol=0)


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3])
def test_label_smoothing_keeps_ln2_at_reference(eps):
    """-(1 - eps) log 1/2 - eps log 1/2 = ln 2 for any eps."""
    logps_B = torch.tensor([-3.0])
    cfg = LossConfig(reference_policy_kl_penalty=0.1, label_smoothing=eps)
    out = _terms(cfg, logps_B, logps_B, logps_B, logps_B)
    assert_close(out.losses_B, torch.tensor([LN2]))


def test_label_smoothing_adds_eps_times_margin():
    """-log sigma(-x) = -log sigma(x) + x, so cDPO = DPO + eps * beta h."""
    for eps in (0.05, 0.2, 0.5):
        smoothed = _loss("dpo", label_smoothing=eps).losses_B
        assert_close(smoothed, _loss("dpo").losses_B + eps * 0.2)


def test_robust_rejects_label_smoothing_of_one_half_at_startup():
    cfg = LossConfig(reference_policy_kl_penalty=0.1, preference_loss="robust", label_smoothing=0.5)
    with pytest.raises(ConfigError, match=r"loss_fn\.label_smoothing=0\.5.*\[0, 0\.5\)"):
        check_loss_config(cfg)
    check_loss_config(LossConfig(preference_loss="robust", label_smoothing=0.49))


def test_dpo_gradient_raises_chosen_and_lowers_rejected():
    """d loss / d chosen = -beta sigma(-beta h) < 0; d loss / d rejected > 0."""
    policy_chosen_B = torch.tensor([-1.0], requires_grad=True)
    policy_rejected_B = torch.tensor([-3.0], requires_grad=True)
    cfg = LossConfig(reference_policy_kl_penalty=0.1)
    out = _terms(cfg, policy_chosen_B, policy_rejected_B, torch.tensor([-2.0]), torch.tensor([-2.0]))
    out.losses_B.sum().backward()
    # -0.1 * sigma(-0.2) = -0.1 * 0.450166
    assert_close(policy_chosen_B.grad, torch.tensor([-0.0450166]))
    assert_close(policy_rejected_B.grad, torch.tensor([0.0450166]))
    assert not out.chosen_rewards_B.requires_grad


def test_discopop_is_finite_for_a_very_negative_margin():
    """Naively exp(-x) * sigma(x / tau) is inf * 0 = nan at x = -100."""
    cfg = LossConfig(reference_policy_kl_penalty=1.0, preference_loss="discopop")
    logps_B = torch.tensor([-100.0], requires_grad=True)
    out = _terms(cfg, logps_B, torch.zeros(1), torch.zeros(1), torch.zeros(1))
    out.losses_B.sum().backward()
    assert_close(out.losses_B, torch.tensor([100.0]))  # -log sigma(-100), m ~ 0
    assert torch.isfinite(logps_B.grad).all()


@pytest.mark.parametrize("name", ["rpo_sq", "rpo_fwd_kl", "rpo_bwd_kl"])
def test_reward_aware_loss_without_gt_rewards_names_the_data_fields(name):
    with pytest.raises(ValueError, match="'chosen_reward' and 'rejected_reward'") as info:
        _loss(name)
    assert f"loss_fn.preference_loss='{name}'" in str(info.value)


def test_unknown_loss_name_lists_valid_names():
    with pytest.raises(ConfigError) as info:
        get_preference_loss("dpoo")
    message = str(info.value)
    assert "Invalid value for 'loss_fn.preference_loss': 'dpoo'." in message
    assert "Did you mean 'dpo'?" in message
    for name in PREFERENCE_LOSSES:
        assert name in message


def test_config_validation_accepts_exactly_the_registered_names():
    """The config layer holds no list of its own: load_config passes any name
    and check_loss_config accepts the registry's names, and only those."""
    assert "loss_fn.preference_loss" not in CHOICES
    for name in PREFERENCE_LOSSES:
        check_loss_config(load_config(None, [f"loss_fn.preference_loss={name}"]).loss_fn)
    loss_cfg = load_config(None, ["loss_fn.preference_loss=dpoo"]).loss_fn
    with pytest.raises(ConfigError, match=r"'loss_fn\.preference_loss': 'dpoo'\. Did you mean 'dpo'\?"):
        check_loss_config(loss_cfg)


@pytest.fixture
def margin_squared():
    """A loss defined here, registered by its decorator alone; unregistered after."""
    @preference_loss("test_margin_squared", length_normalised=True)
    def margin_squared_loss(a_B, b_B, cfg, gt=None):
        """loss = h^2"""
        return (a_B - b_B) ** 2

    yield "test_margin_squared"
    del PREFERENCE_LOSSES["test_margin_squared"]


def test_a_decorated_loss_is_available_by_name(margin_squared):
    """Length-normalised, two pairs (rows c0, r0, c1, r1): per-token policy
    [-2, -3, -1, -1] vs reference [-3, -2, -1, -1] -> h = 1 - (-1) = 2 and 0;
    loss 4 and 0, rewards 0.1 * 1, 0.1 * -1 and 0."""
    cfg = LossConfig(reference_policy_kl_penalty=0.1, preference_loss=margin_squared)
    check_loss_config(cfg)
    terms = pair_terms(torch.tensor([-4.0, -9.0, -5.0, -7.0]), torch.tensor([-6.0, -6.0, -5.0, -7.0]),
                       torch.tensor([2, 3, 5, 7]), cfg)
    assert_close(terms.preference_loss, torch.tensor([4.0, 0.0]))
    assert_close(terms.chosen_reward, torch.tensor([0.1, 0.0]))
    assert_close(terms.rejected_reward, torch.tensor([-0.1, 0.0]))


def test_a_name_cannot_be_registered_twice():
    with pytest.raises(ValueError, match="'dpo' is registered twice"):
        preference_loss("dpo")(lambda a_B, b_B, cfg, gt=None: a_B)
    assert PREFERENCE_LOSSES["dpo"].fn.__name__ == "dpo"


def test_needs_gt_rewards_follows_the_registrations():
    needs = {name for name, entry in PREFERENCE_LOSSES.items() if entry.needs_gt_rewards}
    assert needs == {"rpo_sq", "rpo_fwd_kl", "rpo_bwd_kl"}
