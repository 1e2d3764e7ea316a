"""Packed and prefix-shared micro-batches (data/packing.py) and the attention
that reads them (models/attention.py), against the padded form."""

import math
import random

import pytest
import torch

from megatron_dpo.data import TokenizedPair, make_microbatches
from megatron_dpo.data.packing import collate_packed, shared_prefix_len
from megatron_dpo.parallel.logprobs import packed_sequence_logprobs, sequence_logprobs

PAD = 0


def test_packing_puts_sequences_back_to_back_with_restarting_positions():
    pair = TokenizedPair([1, 10, 11, 2], [1, 10, 12, 13, 2], 2, 2)
    batch = collate_packed([pair], PAD, seq_length=12, prefix_sharing=False)
    assert batch["tokens"].tolist() == [[1, 10, 11, 2, 1, 10, 12, 13, 2, 0, 0, 0]]
    assert batch["labels"].tolist() == [[10, 11, 2, 0, 10, 12, 13, 2, 0, 0, 0, 0]]
    assert batch["loss_mask"].tolist() == [[0, 1, 1, 0, 0, 1, 1, 1, 0, 0, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1, 2, 3, 4, 0, 1, 2]]
    assert batch["sequence_ids"].tolist() == [[0, 0, 0, 0, 1, 1, 1, 1, 1, 0, 0, 0]]
    assert batch["cu_seqlens"].tolist() == [0, 4, 9, 12]  # the pad tail is a segment of its own
    assert batch["num_sequences"] == 2 and "branch_ids" not in batch


def test_prefix_sharing_computes_the_prompt_once_and_branches_continue_from_it():
    # Prompt [1, 10, 20]: [1, 10] is shared; each branch starts with its own copy of 20,
    # whose logits score the branch's first completion token.
    pair = TokenizedPair([1, 10, 20, 11, 2], [1, 10, 20, 12, 13, 2], 3, 3)
    batch = collate_packed([pair], PAD, seq_length=9, prefix_sharing=True)
    assert batch["tokens"].tolist() == [[1, 10, 20, 11, 2, 20, 12, 13, 2]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 2, 3, 4, 5]]
    assert batch["branch_ids"].tolist() == [[0, 0, 1, 1, 1, 2, 2, 2, 2]]
    assert batch["labels"].tolist() == [[10, 20, 11, 2, 0, 12, 13, 2, 0]]
    assert batch["loss_mask"].tolist() == [[0, 0, 1, 1, 0, 1, 1, 1, 0]]
    assert batch["sequence_ids"][0, 2:].tolist() == [0, 0, 0, 1, 1, 1, 1]
    assert batch["cu_seqlens"].tolist() == [0, 9]


def test_prefix_sharing_shares_only_tokens_both_sequences_hold():
    # truncate_sequence / keep_end cut chosen by 1 and rejected by 2 tokens from
    # the start (prompt [1, 10, 11]): the sequences start differently, nothing is shared.
    pair = TokenizedPair([10, 11, 12, 2], [11, 13, 13, 2], 2, 1)
    assert shared_prefix_len(pair) == 0
    batch = collate_packed([pair], PAD, seq_length=8, prefix_sharing=True)
    assert batch["tokens"].tolist() == [[10, 11, 12, 2, 11, 13, 13, 2]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1, 2, 3]]
    assert batch["loss_mask"].tolist() == [[0, 1, 1, 0, 1, 1, 1, 0]]
    assert shared_prefix_len(TokenizedPair([1, 10, 11, 12, 2], [1, 10, 11, 13, 2], 3, 3)) == 2


def random_pairs(num_pairs: int, seed: int):
    rng = random.Random(seed)
    pairs = []
    for _ in range(num_pairs):
        prompt = [rng.randrange(3, 50) for _ in range(rng.randrange(0, 6))]
        chosen = prompt + [rng.randrange(3, 50) for _ in range(rng.randrange(1, 6))] + [2]
        rejected = prompt + [rng.randrange(3, 50) for _ in range(rng.randrange(1, 6))] + [2]
        # A token merged across the prompt boundary: the prompt of both ends a token early.
        prompt_len = max(len(prompt) - rng.randrange(2), 0)
        cuts = [rng.randrange(min(3, len(ids) - 1)) if rng.random() < 0.3 else 0 for ids in (chosen, rejected)]
        # truncate_sequence / keep_end cuts each sequence's start on its own: prompts of different lengths.
        pairs.append(TokenizedPair(chosen[cuts[0]:], rejected[cuts[1]:],
                                   max(prompt_len - cuts[0], 0), max(prompt_len - cuts[1], 0)))
    return pairs


def scored_labels(batch, num_sequences):
    """Per sequence, the (position, label) pairs its loss mask scores, in order."""
    scored = [[] for _ in range(num_sequences)]
    positions, labels, mask = batch["position_ids"], batch["labels"], batch["loss_mask"]
    for row in range(labels.shape[0]):
        for t in range(labels.shape[1]):
            if mask[row, t]:
                sequence = batch["sequence_ids"][row, t].item() if "sequence_ids" in batch else row
                scored[sequence].append((positions[row, t].item(), labels[row, t].item()))
    return scored


@pytest.mark.parametrize("prefix_sharing", [False, True])
def test_packed_forms_score_the_same_labels_at_the_same_positions(prefix_sharing):
    pairs = random_pairs(6, seed=1)
    padded = make_microbatches(pairs, 3, PAD)
    packed = make_microbatches(pairs, 3, PAD, packing=True, prefix_sharing=prefix_sharing)
    assert len({batch["tokens"].shape for batch in packed}) == 1  # one shape per step (pipeline p2p)
    assert packed[0]["tokens"].shape[1] % 8 == 0
    for padded_batch, packed_batch in zip(padded, packed):
        assert scored_labels(packed_batch, 6) == scored_labels(padded_batch, 6)


def test_packed_batches_carry_the_pairs_fields():
    pairs = random_pairs(2, seed=2)
    pairs[0].reference_logps, pairs[1].reference_logps = (-1.0, -2.0), (-3.0, -4.0)
    batch = make_microbatches(pairs, 2, PAD, prefix_sharing=True)[0]
    assert batch["reference_logps"].tolist() == [-1.0, -2.0, -3.0, -4.0]


def test_packed_sequence_logprobs_equal_the_padded_sums():
    pairs = random_pairs(4, seed=3)
    padded = make_microbatches(pairs, 4, PAD)[0]
    packed = make_microbatches(pairs, 4, PAD, prefix_sharing=True)[0]
    # A log-prob that depends only on (position, label): both forms score the same ones.
    def fake_logprobs(batch):
        return -(batch["position_ids"] * 7 + batch["labels"]).float().sqrt()
    want = sequence_logprobs(fake_logprobs(padded), padded["loss_mask"])
    got = packed_sequence_logprobs(fake_logprobs(packed), packed["loss_mask"], packed["sequence_ids"], 8)
    torch.testing.assert_close(got, want)


# ---------------------------------------------------------------- attention
def test_rejected_branch_sees_the_prompt_and_itself():
    from megatron_dpo.models.attention import rejected_mask

    assert rejected_mask(shared=2, rejected=3).int().tolist() == [
        [1, 1, 1, 0, 0],
        [1, 1, 1, 1, 0],
        [1, 1, 1, 1, 1],
    ]


def test_packed_seq_params_segments_and_thd():
    from megatron_dpo.models.attention import Segment, packed_seq_params

    pairs = [TokenizedPair([1, 10, 20, 11, 2], [1, 10, 20, 12, 13, 2], 3, 3),
             TokenizedPair([1, 30, 2], [1, 31, 32, 2], 1, 1)]
    packed = make_microbatches(pairs, 2, PAD, packing=True)[0]
    segmented = packed_seq_params(packed, te_attention=False)
    assert segmented.qkv_format == "sbhd"
    assert segmented.segments == [Segment(5), Segment(6), Segment(3), Segment(4), Segment(6)]  # pad tail last
    thd = packed_seq_params(packed, te_attention=True)
    assert thd.qkv_format == "thd" and thd.cu_seqlens_q.tolist() == [0, 5, 11, 14, 18, 24]
    assert thd.cu_seqlens_q.dtype == torch.int32 and thd.max_seqlen_q == 6
    # Prefix sharing without TE: shared prompt [1, 10] / [] and each branch with
    # its copy of the last prompt token; 9 + 7 tokens fill the row, no pad tail.
    # (With TE: its THD form, tests/unit/test_thd_prefix.py.)
    shared = packed_seq_params(make_microbatches(pairs, 2, PAD, prefix_sharing=True)[0], te_attention=False)
    assert shared.segments == [Segment(5, 2, 4), Segment(3, 0, 4)]
    assert shared.split_sizes() == [5, 4, 3, 4] and len(shared.rejected_masks) == 2


def tree_mask(branch_ids_S):
    """Dense prefix-sharing mask: causal, and never across branches 1 / 2."""
    causal = torch.ones(len(branch_ids_S), len(branch_ids_S), dtype=torch.bool).tril()
    key, query = branch_ids_S[None, :], branch_ids_S[:, None]
    return causal & ((key == 0) | (key == query))


def naive_attention(q_SND, k_SND, v_SND, allowed_SS):
    scores = torch.einsum("qnd,knd->nqk", q_SND, k_SND) / math.sqrt(q_SND.shape[-1])
    probs = scores.masked_fill(~allowed_SS, float("-inf")).softmax(-1)
    return torch.einsum("nqk,knd->qnd", probs, v_SND)


@pytest.mark.parametrize("num_heads,num_groups", [(4, 4), (4, 2)])
def test_sdpa_attention_matches_dense_masked_attention(num_heads, num_groups):
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_dpo.models.attention import SDPAttention, packed_seq_params

    config = TransformerConfig(num_layers=1, hidden_size=32, num_attention_heads=num_heads,
                               num_query_groups=num_groups, attention_dropout=0.0)
    attention = SDPAttention(config, layer_number=1, attn_mask_type=None, attention_type="self")
    batch = make_microbatches(random_pairs(3, seed=5), 3, PAD, prefix_sharing=True)[0]
    seq_len, head_dim = batch["tokens"].shape[1], config.kv_channels
    generator = torch.Generator().manual_seed(0)
    query, key, value = (torch.randn(seq_len, 1, n, head_dim, generator=generator)
                         for n in (num_heads, num_groups, num_groups))
    got = attention(query, key, value, None, packed_seq_params=packed_seq_params(batch, te_attention=False))
    # Dense reference: within-segment blocks of the prefix-sharing mask.
    allowed = torch.zeros(seq_len, seq_len, dtype=torch.bool)
    bounds = batch["cu_seqlens"].tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        allowed[start:end, start:end] = tree_mask(batch["branch_ids"][0, start:end])
    repeat = num_heads // num_groups
    want = naive_attention(query[:, 0], key[:, 0].repeat_interleave(repeat, 1),
                           value[:, 0].repeat_interleave(repeat, 1), allowed)
    torch.testing.assert_close(got, want.reshape(seq_len, 1, -1), rtol=1e-5, atol=1e-5)
    causal = naive_attention(query[:, 0], key[:, 0].repeat_interleave(repeat, 1),
                             value[:, 0].repeat_interleave(repeat, 1),
                             torch.ones(seq_len, seq_len, dtype=torch.bool).tril())
    torch.testing.assert_close(attention(query, key, value, None), causal.reshape(seq_len, 1, -1),
                               rtol=1e-5, atol=1e-5)
