"""Data pipeline: tokenization masks and truncation, sampler, collate, demo data.
Input formats and their errors: test_data_formats.py."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_dpo.config.schema import DataConfig
from megatron_dpo.data import (
    DataError, PairSampler, PreferencePair, TokenizedPair, build_dataset,
    collate_microbatch, load_pairs, make_microbatches, step_seq_length, tokenize_pairs,
)

ROOT = Path(__file__).resolve().parents[2]
TINY_TOKENIZER = ROOT / "megatron_dpo/models/presets/tiny_tokenizer"
PAD, BOS, EOS = 0, 1, 2


class PieceTokenizer:
    """Greedy longest-match over a fixed piece list, prepending BOS like Llama.

    "bc" is one piece, so "qb" + "c" merges across the prompt/completion boundary.
    """

    vocab = {"</s>": EOS, "q": 10, "a": 11, "b": 12, "c": 13, "bc": 20}
    bos_token_id, eos_token_id, eos_token = BOS, EOS, "</s>"

    def __call__(self, texts, add_special_tokens=True):
        return {"input_ids": [self._encode(t, add_special_tokens) for t in texts]}

    def _encode(self, text, add_special_tokens):
        ids = [BOS] if add_special_tokens else []
        while text:
            piece = max((p for p in self.vocab if text.startswith(p)), key=len)
            ids.append(self.vocab[piece])
            text = text[len(piece):]
        return ids


def tok(pairs, max_length=64, policy="truncate", mode="keep_end"):
    return tokenize_pairs([PreferencePair(*p) for p in pairs], PieceTokenizer(), max_length, policy, mode)


# ---------------------------------------------------------------- tokenize
def test_tokenize_marks_completion_with_one_eos():
    # prompt "qa" -> [BOS, q, a]; "qab" + EOS, "qacc" + EOS.
    result = tok([("qa", "b", "cc")])
    assert result.pairs == [TokenizedPair([1, 10, 11, 12, 2], [1, 10, 11, 13, 13, 2], 3, 3)]
    # A completion whose text already ends in EOS gets no second one.
    assert tok([("qa", "b</s>", "c")]).pairs[0].chosen_ids == [1, 10, 11, 12, 2]


def test_boundary_is_the_shorter_common_prefix_for_both_sequences():
    # encode("qb") = [BOS, q, b] but encode("qbc") = [BOS, q, bc]: the merged
    # token carries completion text, so chosen's common prefix is 2; rejected
    # "qba" keeps [BOS, q, b] (3). As TRL, both take the shorter: 2, so the
    # rejected completion scores "b a" + EOS, the same characters after "q".
    pair = tok([("qb", "c", "a")]).pairs[0]
    assert pair == TokenizedPair([1, 10, 20, 2], [1, 10, 12, 11, 2], 2, 2)


def test_truncate_cuts_prompt_start_keeping_bos_and_prompt_end():
    # prompt [BOS q a a a a a] (7); chosen 9 tokens, rejected 10; both lose 4.
    result = tok([("qaaaaa", "b", "cc")], max_length=6)
    assert result.num_truncated == 1 and result.num_dropped == 0
    assert result.pairs == [TokenizedPair([1, 11, 11, 12, 2], [1, 11, 11, 13, 13, 2], 3, 3)]


def test_truncate_keep_start_cuts_prompt_end():
    # prompt [BOS q b a a a a] (7) loses its last 4 tokens, keeping [BOS q b].
    result = tok([("qbaaaa", "b", "cc")], max_length=6, mode="keep_start")
    assert result.pairs == [TokenizedPair([1, 10, 12, 12, 2], [1, 10, 12, 13, 13, 2], 3, 3)]


def test_truncate_sequence_keep_start_cuts_each_end_and_drops_pairs_the_prompt_fills():
    # "qa"+"b" = [BOS q a b EOS], "qa"+"cc" = [BOS q a c c EOS], prompt 3: both
    # keep their first 4 tokens. "qaaa": its prompt [BOS q a a a] alone fills
    # max_length=4, so TRL drops the pair.
    result = tok([("qa", "b", "cc"), ("qaaa", "b", "c")], max_length=4, policy="truncate_sequence",
                 mode="keep_start")
    assert result.pairs == [TokenizedPair([1, 10, 11, 12], [1, 10, 11, 13], 3, 3)]
    assert (result.num_dropped, result.num_truncated) == (1, 1)


def test_truncate_sequence_keep_end_cuts_each_start_on_its_own():
    # Chosen (5 tokens) loses BOS, rejected (6) loses BOS and q: prompts 2 and 1.
    result = tok([("qa", "b", "cc"), ("q", "b", "c")], max_length=4, policy="truncate_sequence", mode="keep_end")
    assert result.pairs == [TokenizedPair([10, 11, 12, 2], [11, 13, 13, 2], 2, 1),
                            TokenizedPair([1, 10, 12, 2], [1, 10, 13, 2], 2, 2)]
    assert (result.num_dropped, result.num_truncated) == (0, 1)


def test_truncate_cuts_completion_end_when_prompt_is_gone():
    pair = tok([("qaaaaa", "b", "cc")], max_length=3).pairs[0]
    assert pair == TokenizedPair([1, 12, 2], [1, 13, 13], 1, 1)


def test_drop_counts_and_all_dropped_error_names_the_key():
    result = tok([("qa", "b", "c"), ("qaaaaa", "b", "cc")], max_length=9, policy="drop")
    assert (len(result.pairs), result.num_dropped, result.num_truncated) == (1, 1, 0)
    with pytest.raises(DataError, match=r"max_length=4.*policy\.max_total_sequence_length"):
        tok([("qaaaaa", "b", "cc")], max_length=4, policy="drop")


def test_unknown_overlength_policy_or_truncation_mode():
    with pytest.raises(DataError, match="data.overlength_policy"):
        tok([("qa", "b", "c")], policy="clip")
    with pytest.raises(DataError, match=r"data.truncation_mode='middle'; choose one of \['keep_end', 'keep_start'\]"):
        tok([("qa", "b", "c")], mode="middle")


def test_tokenize_carries_rewards_and_collate_interleaves_them():
    pairs = [PreferencePair("qa", "b", "c", 1.5, -0.5), PreferencePair("qa", "c", "b", 0.25, 0.0)]
    result = tokenize_pairs(pairs, PieceTokenizer(), 3, "truncate", "keep_end")
    assert [(p.chosen_reward, p.rejected_reward) for p in result.pairs] == [(1.5, -0.5), (0.25, 0.0)]
    result.pairs[0].reference_logps, result.pairs[1].reference_logps = (-1.0, -2.0), (-3.0, -4.0)
    batch = collate_microbatch(result.pairs, pad_id=PAD, seq_length=4)
    assert batch["gt_rewards"].tolist() == [1.5, -0.5, 0.25, 0.0]
    assert batch["reference_logps"].tolist() == [-1.0, -2.0, -3.0, -4.0]
    assert "gt_rewards" not in collate_microbatch([TokenizedPair([1, 2], [1, 3], 1, 1)], PAD, 2)


# ---------------------------------------------------------------- sampler
def steps(sampler, num_epochs=1):
    return [batch for _ in range(num_epochs) for batch in sampler]


def test_sampler_file_order_drops_incomplete_batch():
    sampler = PairSampler(10, 4, dp_rank=0, dp_size=1, shuffle=False, seed=0)
    assert (sampler.steps_per_epoch, len(sampler), sampler.epoch) == (2, 2, 0)
    assert steps(sampler, 2) == [[0, 1, 2, 3], [4, 5, 6, 7]] * 2
    assert (sampler.epoch, sampler.consumed_pairs) == (2, 16)


def test_sampler_shuffle_is_seeded_and_changes_per_epoch():
    first = steps(PairSampler(40, 8, 0, 1, shuffle=True, seed=3), 2)
    assert first == steps(PairSampler(40, 8, 0, 1, shuffle=True, seed=3), 2)
    assert first != steps(PairSampler(40, 8, 0, 1, shuffle=True, seed=4), 2)
    assert first[:5] != first[5:]
    assert sorted(i for batch in first[:5] for i in batch) == list(range(40))


@pytest.mark.parametrize("dp_size", [2, 4])
def test_sampler_dp_ranks_union_is_the_global_batch(dp_size):
    single = steps(PairSampler(50, 8, 0, 1, shuffle=True, seed=7), 2)
    per_rank = [steps(PairSampler(50, 8, r, dp_size, shuffle=True, seed=7), 2) for r in range(dp_size)]
    for step, batch in enumerate(single):
        assert [i for rank in per_rank for i in rank[step]] == batch


@pytest.mark.parametrize("resume_step", [1, 5, 6, 9])
def test_sampler_resume_continues_the_uninterrupted_run(resume_step):
    full = steps(PairSampler(50, 8, 1, 2, shuffle=True, seed=7), 3)  # 6 steps per epoch
    resumed = PairSampler(50, 8, 1, 2, shuffle=True, seed=7, consumed_pairs=resume_step * 8)
    assert resumed.epoch == resume_step // 6
    assert steps(resumed, 3 - resumed.epoch) == full[resume_step:]


def test_sampler_state_dict_roundtrip_and_mismatch():
    sampler = PairSampler(50, 8, 0, 1, shuffle=True, seed=7)
    next(iter(sampler))
    restored = PairSampler(50, 8, 0, 2, shuffle=True, seed=7)
    restored.load_state_dict(sampler.state_dict())
    assert restored.consumed_pairs == 8 and len(restored) == 5
    with pytest.raises(ValueError, match="checkpoint has seed=7, this run 8"):
        PairSampler(50, 8, 0, 1, shuffle=True, seed=8).load_state_dict(sampler.state_dict())


def test_sampler_errors():
    with pytest.raises(DataError, match="3 pairs, fewer than one global batch"):
        PairSampler(3, 4, 0, 1, shuffle=False, seed=0)
    with pytest.raises(ValueError, match="not divisible by the data-parallel size 4"):
        PairSampler(30, 6, 0, 4, shuffle=False, seed=0)
    with pytest.raises(ValueError, match="multiple of the global batch size 4"):
        PairSampler(30, 4, 0, 1, shuffle=False, seed=0, consumed_pairs=6)


# ---------------------------------------------------------------- collate
def test_collate_interleaves_pads_and_masks_completion_labels():
    pair = TokenizedPair([1, 10, 11, 12, 2], [1, 10, 11, 13, 13, 2], 3, 3)
    batch = collate_microbatch([pair], pad_id=PAD, seq_length=8)
    assert {k: (v.shape, v.dtype) for k, v in batch.items()} == {
        "tokens": ((2, 8), torch.long), "labels": ((2, 8), torch.long),
        "loss_mask": ((2, 8), torch.float32), "position_ids": ((2, 8), torch.long)}
    assert batch["tokens"].tolist() == [[1, 10, 11, 12, 2, 0, 0, 0], [1, 10, 11, 13, 13, 2, 0, 0]]
    assert batch["labels"].tolist() == [[10, 11, 12, 2, 0, 0, 0, 0], [10, 11, 13, 13, 2, 0, 0, 0]]
    # Scored labels: chosen "b" + EOS, rejected "c c" + EOS; never prompt or pad.
    assert batch["loss_mask"].tolist() == [[0, 0, 1, 1, 0, 0, 0, 0], [0, 0, 1, 1, 1, 0, 0, 0]]
    assert batch["labels"][batch["loss_mask"].bool()].tolist() == [12, 2, 13, 13, 2]
    assert batch["position_ids"][1].tolist() == list(range(8))


def test_make_microbatches_share_one_step_length():
    short = TokenizedPair([1, 10, 2], [1, 11, 2], 2, 2)
    long = TokenizedPair([1] * 9 + [2], [1, 12, 2], 2, 2)
    assert step_seq_length([short, long]) == 16 and step_seq_length([short], 4) == 4
    micro = make_microbatches([short, long, short, short], micro_batch_size=2, pad_id=PAD)
    assert [m["tokens"].shape for m in micro] == [(4, 16), (4, 16)]
    assert micro[1]["tokens"][:, 3:].eq(PAD).all()
    with pytest.raises(ValueError, match="do not split into micro-batches of 3"):
        make_microbatches([short, long], micro_batch_size=3, pad_id=PAD)


# ---------------------------------------------------------------- demo data + tiny tokenizer
@pytest.fixture(scope="module")
def tiny_tokenizer():
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(TINY_TOKENIZER))


def test_tiny_tokenizer_loads_offline():
    code = ("from transformers import AutoTokenizer as A; t = A.from_pretrained(%r); "
            "print(len(t), t.encode('hi')[0] == t.bos_token_id)" % str(TINY_TOKENIZER))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["768", "True"]


def test_demo_data_tokenizes_short_with_chat_prompts(tiny_tokenizer):
    t = tiny_tokenizer
    assert (t.bos_token, t.eos_token, t.pad_token, t.unk_token) == ("<s>", "</s>", "<pad>", "<unk>")
    for split, size in (("train", 600), ("val", 64)):
        pairs = load_pairs(str(ROOT / f"data/demo/{split}.jsonl"), DataConfig())
        result = build_dataset(str(ROOT / f"data/demo/{split}.jsonl"), DataConfig(), t, max_length=64)
        assert len(result.pairs) == size and result.num_truncated == result.num_dropped == 0
        for pair, tp in zip(pairs, result.pairs):
            assert max(len(tp.chosen_ids), len(tp.rejected_ids)) < 64
            assert tp.chosen_ids[0] == t.bos_token_id
            assert t.decode(tp.chosen_ids[tp.chosen_prompt_len:]) == pair.chosen + "</s>"
            assert t.decode(tp.rejected_ids[tp.rejected_prompt_len:]) == pair.rejected + "</s>"
        question = pairs[0].prompt.split("\n")[1]
        rendered = t.apply_chat_template([{"role": "user", "content": question}],
                                         tokenize=False, add_generation_prompt=True)
        assert rendered == pairs[0].prompt


def test_demo_val_prompts_are_held_out():
    def prompts(split):
        return {p.prompt for p in load_pairs(str(ROOT / f"data/demo/{split}.jsonl"), DataConfig())}
    assert not prompts("train") & prompts("val")
