"""Benchmark pieces: synthetic lengths, FLOP counting, timers (megatron_dpo/perf)."""

import time

import pytest

from megatron_dpo.data import TokenizedPair
from megatron_dpo.models.architecture import ModelArchitecture
from megatron_dpo.perf.flops import matmul_params, pair_work, step_flops
from megatron_dpo.perf.synthetic import synthetic_pairs, truncated_lengths
from megatron_dpo.perf.timing import CommTimer, PeakRss, PhaseTimer

ARCH = ModelArchitecture(num_layers=2, hidden_size=8, ffn_hidden_size=16, num_attention_heads=2,
                         num_query_groups=1, vocab_size=10)


def test_truncation_cuts_the_prompt_first_then_completions():
    assert truncated_lengths(100, 30, 20, max_length=64) == (34, 30, 20)
    assert truncated_lengths(100, 90, 20, max_length=64) == (1, 63, 20)
    assert truncated_lengths(10, 30, 20, max_length=64) == (10, 30, 20)


@pytest.mark.parametrize("lengths", ["ultrafeedback", "hh-rlhf", "mix"])
def test_synthetic_pairs_share_a_prompt_fit_and_are_seeded(lengths):
    pairs = synthetic_pairs(200, lengths, max_length=128, vocab_size=50, seed=0)
    assert pairs == synthetic_pairs(200, lengths, max_length=128, vocab_size=50, seed=0)
    for pair in pairs:
        prompt = pair.chosen_prompt_len
        assert pair.rejected_prompt_len == prompt and pair.chosen_ids[:prompt] == pair.rejected_ids[:prompt]
        assert max(len(pair.chosen_ids), len(pair.rejected_ids)) <= 128
        assert min(len(pair.chosen_ids), len(pair.rejected_ids)) > prompt >= 1


def test_mix_alternates_long_and_short_completions():
    pairs = synthetic_pairs(400, "mix", max_length=4096, vocab_size=50, seed=1)
    completion = [len(p.chosen_ids) - p.chosen_prompt_len for p in pairs]
    ultrafeedback, hh_rlhf = sorted(completion[0::2]), sorted(completion[1::2])
    assert ultrafeedback[100] > 3 * hh_rlhf[100]  # medians ~270 vs ~50


def test_matmul_params_count_projections_mlp_and_output_layer():
    # head_dim 4: qkv 8 x (2 + 2 x 1) x 4 = 128, proj 2 x 4 x 8 = 64, SwiGLU 3 x 8 x 16 = 384;
    # output layer 8 x 10.
    assert matmul_params(ARCH) == 2 * (128 + 64 + 384) + 80


def test_pair_work_counts_real_tokens_and_visible_keys():
    pair = TokenizedPair([1, 2, 3, 4], [1, 2, 3, 5, 6], 3, 3)
    assert pair_work(pair, prefix_sharing=False) == (9, 10 + 15)
    # Shared [1, 2]; branches [3, 4] and [3, 5, 6] each see the 2 shared tokens.
    assert pair_work(pair, prefix_sharing=True) == (7, 3 + 3 + 6 + (2 + 3) * 2)


def test_step_flops_training_and_reference_forward():
    pair = TokenizedPair([1, 2, 3, 4], [1, 2, 3, 5, 6], 3, 3)
    forward = 2 * matmul_params(ARCH) * 9 + 4 * 2 * 2 * 4 * 25
    flops = step_flops(ARCH, [pair], prefix_sharing=False, online_reference=True)
    assert (flops.tokens, flops.policy, flops.reference, flops.total) == (9, 3 * forward, forward, 4 * forward)
    assert step_flops(ARCH, [pair], prefix_sharing=False, online_reference=False).reference == 0.0


def test_comm_timer_counts_only_the_outer_call():
    timer = CommTimer()
    inner = timer._wrap(lambda: None)
    outer = timer._wrap(lambda: [inner(), inner()])
    assert outer() == [None, None] and timer.calls == 1
    timer.reset()
    assert timer._wrap(lambda: 3)() == 3 and timer.calls == 1  # only torch.distributed Work is wrapped


def test_phase_timer_sums_per_phase():
    timer = PhaseTimer()
    for _ in range(2):
        with timer("policy"):
            pass
    assert set(timer.seconds) == {"policy"} and timer.seconds["policy"] >= 0.0


def test_peak_rss_sees_a_tensor_freed_inside():
    import torch

    with PeakRss(interval=0.001) as rss:
        block = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
        time.sleep(0.05)
        del block
    assert rss.peak - rss.start > 48 * 2**20
