"""Token ids and completion masks equal TRL's DPOTrainer (1.16) for prompts
whose end merges into the first token of one completion but not the other
(a space, a newline, mid-word), plain and chat, and for TRL's truncation.

How the expected values were derived (TRL is not a dependency of this
project or its tests): in a separate virtualenv with trl 1.16.0,
transformers 5.24.0, tokenizers 0.23.3, datasets 5.2.0 and torch 2.13.0 (CPU),
the rows below went through TRL's own code, ``DPOTrainer._prepare_dataset``
(add EOS, tokenize, prompt boundary, keep_start filter; called on a stub
trainer with ``args = (dataset_num_proc=None, max_length, truncation_mode)``)
and then ``DataCollatorForPreference(pad_token_id, max_length,
truncation_mode)``; the unpadded ``input_ids`` and ``completion_mask`` rows of
each pair were printed and pasted here, unedited. Tokenizer: the project's
tiny tokenizer; "+nl" adds one token "\\n\\n" (as Llama 3 and Qwen have), the
only way this tokenizer merges across a newline.
"""

from pathlib import Path

import pytest
import torch

from megatron_dpo.data import PreferencePair, collate_microbatch, tokenize_pairs

TINY_TOKENIZER = Path(__file__).resolve().parents[2] / "megatron_dpo/models/presets/tiny_tokenizer"

CONCAT_TEMPLATE = "{% for m in messages %}{{ m['content'] }}{% endfor %}"  # no generation prompt


def user(text):
    return [{"role": "user", "content": text}]


def assistant(text):
    return [{"role": "assistant", "content": text}]


def tokenizer(newline_token=False, template=None):
    from transformers import AutoTokenizer

    loaded = AutoTokenizer.from_pretrained(str(TINY_TOKENIZER))
    if newline_token:
        loaded.add_tokens(["\n\n"])
    if template is not None:
        loaded.chat_template = template
    return loaded


# name: (tokenizer options, (prompt, chosen, rejected),
#        TRL's (chosen input_ids, chosen completion_mask, rejected input_ids, rejected completion_mask))
CASES = {
    # "? " + "Paris" -> "ĠParis" merges; "? " + "42" keeps "Ġ" apart: both prompts end before "Ġ".
    "plain, prompt ends in a space": (
        {}, ("What is the capital of France? ", "Paris.", "42, I think."),
        ([1, 343, 288, 274, 72, 291, 68, 83, 273, 322, 327, 336, 85, 272, 403, 34, 719, 17, 2], [0] * 16 + [1] * 3,
         [1, 343, 288, 274, 72, 291, 68, 83, 273, 322, 327, 336, 85, 272, 403, 34, 224, 23, 21, 15, 296, 604, 17, 2],
         [0] * 16 + [1] * 8)),
    # "capi" + "tal" -> "it al" (the "i" merges); "capi" + " of" keeps "i".
    "plain, prompt ends mid-word": (
        {}, ("Name the capi", "tal of France.", " of France."),
        ([1, 49, 68, 373, 274, 72, 291, 68, 83, 273, 322, 327, 336, 85, 272, 403, 17, 2], [0] * 9 + [1] * 9,
         [1, 49, 68, 373, 274, 72, 291, 68, 83, 76, 327, 336, 85, 272, 403, 17, 2], [0] * 9 + [1] * 8)),
    # ":\n" + "\nParis" -> "\n\n" (768) merges; ":\n" + "Paris" keeps "\n" (202).
    "plain, prompt ends in a newline (+nl)": (
        {"newline_token": True}, ("Answer in one word:\n", "\nParis.", "Paris."),
        ([1, 36, 81, 449, 266, 347, 224, 314, 388, 71, 29, 768, 51, 715, 17, 2], [0] * 11 + [1] * 5,
         [1, 36, 81, 449, 266, 347, 224, 314, 388, 71, 29, 202, 51, 715, 17, 2], [0] * 11 + [1] * 5)),
    # Prompt-free data: only BOS precedes the completion.
    "plain, empty prompt": (
        {}, ("", "Paris.", "Lyon."),
        ([1, 51, 715, 17, 2], [0] + [1] * 4, [1, 47, 92, 281, 17, 2], [0] + [1] * 5)),
    # The tiny template's generation prompt "<|assistant|>\n" ends in a newline
    # that merges with a completion starting with one. No BOS, no EOS: the template's.
    "chat with a generation prompt, newline (+nl)": (
        {"newline_token": True}, (user("Capital of France?"), assistant("\nParis."), assistant("Lyon.")),
        ([267, 302, 268, 202, 38, 68, 83, 273, 322, 327, 336, 85, 272, 403, 34, 202, 267, 304, 268, 768, 51, 715,
          17, 202], [0] * 19 + [1] * 5,
         [267, 302, 268, 202, 38, 68, 83, 273, 322, 327, 336, 85, 272, 403, 34, 202, 267, 304, 268, 202, 47, 92,
          281, 17, 202], [0] * 19 + [1] * 6)),
    "chat without a generation prompt, space": (
        {"template": CONCAT_TEMPLATE},
        (user("What is the capital of France? "), assistant("Paris."), assistant("42, I think.")),
        ([343, 288, 274, 72, 291, 68, 83, 273, 322, 327, 336, 85, 272, 403, 34, 719, 17], [0] * 15 + [1] * 2,
         [343, 288, 274, 72, 291, 68, 83, 273, 322, 327, 336, 85, 272, 403, 34, 224, 23, 21, 15, 296, 604, 17],
         [0] * 15 + [1] * 7)),
    "chat without a generation prompt, mid-word": (
        {"template": CONCAT_TEMPLATE}, (user("Name the capi"), assistant("tal of France."), assistant(" of France.")),
        ([49, 68, 373, 274, 72, 291, 68, 83, 273, 322, 327, 336, 85, 272, 403, 17], [0] * 8 + [1] * 8,
         [49, 68, 373, 274, 72, 291, 68, 83, 76, 327, 336, 85, 272, 403, 17], [0] * 8 + [1] * 7)),
}


def completion_masks(pair):
    return ([0] * pair.chosen_prompt_len + [1] * (len(pair.chosen_ids) - pair.chosen_prompt_len),
            [0] * pair.rejected_prompt_len + [1] * (len(pair.rejected_ids) - pair.rejected_prompt_len))


@pytest.mark.parametrize("name", list(CASES))
def test_ids_and_completion_masks_equal_trl(name):
    options, row, (chosen, chosen_mask, rejected, rejected_mask) = CASES[name]
    (pair,) = tokenize_pairs([PreferencePair(*row)], tokenizer(**options), 512, "truncate", "keep_end").pairs
    assert (pair.chosen_ids, pair.rejected_ids) == (chosen, rejected)
    assert completion_masks(pair) == (chosen_mask, rejected_mask)


def test_loss_mask_is_trls_shifted_completion_mask():
    # TRL scores label input_ids[:, 1:] where completion_mask[:, 1:] is 1.
    options, row, (chosen, chosen_mask, rejected, rejected_mask) = CASES["plain, prompt ends in a space"]
    pairs = tokenize_pairs([PreferencePair(*row)], tokenizer(**options), 512, "truncate", "keep_end").pairs
    batch = collate_microbatch(pairs, pad_id=0, seq_length=24)
    expected = torch.zeros(2, 24)
    expected[0, :len(chosen) - 1] = torch.tensor(chosen_mask[1:], dtype=torch.float32)
    expected[1, :len(rejected) - 1] = torch.tensor(rejected_mask[1:], dtype=torch.float32)
    torch.testing.assert_close(batch["loss_mask"], expected)


TRUNCATION_ROWS = [PreferencePair("Name the capi", "tal of France.", " of France, I think."),
                   PreferencePair("What is the capital of France? ", "Paris.", "42.")]
# (mode, max_length): TRL's kept pairs as (chosen ids, rejected ids, chosen prompt len, rejected prompt len),
# prompt lengths read off TRL's completion masks (zeros, then ones).
TRUNCATED = {
    # Row 2's prompt (16 tokens) fills 12: TRL drops it. Row 1 cut after 12 tokens.
    ("keep_start", 12): [([1, 49, 68, 373, 274, 72, 291, 68, 83, 273, 322, 327],
                          [1, 49, 68, 373, 274, 72, 291, 68, 83, 76, 327, 336], 9, 9)],
    # Each sequence loses its own start: the two keep prompts of different lengths.
    ("keep_end", 12): [([291, 68, 83, 273, 322, 327, 336, 85, 272, 403, 17, 2],
                        [83, 76, 327, 336, 85, 272, 403, 15, 296, 604, 17, 2], 3, 1),
                       ([83, 273, 322, 327, 336, 85, 272, 403, 34, 719, 17, 2],
                        [322, 327, 336, 85, 272, 403, 34, 224, 23, 21, 17, 2], 9, 7)],
    # Row 1 loses its whole prompt and the completion's first token.
    ("keep_end", 8): [([322, 327, 336, 85, 272, 403, 17, 2], [85, 272, 403, 15, 296, 604, 17, 2], 0, 0),
                      ([336, 85, 272, 403, 34, 719, 17, 2], [272, 403, 34, 224, 23, 21, 17, 2], 5, 3)],
}


@pytest.mark.parametrize("mode, max_length", list(TRUNCATED))
def test_truncate_sequence_equals_trl(mode, max_length):
    result = tokenize_pairs(TRUNCATION_ROWS, tokenizer(), max_length, "truncate_sequence", mode)
    kept = [(p.chosen_ids, p.rejected_ids, p.chosen_prompt_len, p.rejected_prompt_len) for p in result.pairs]
    assert kept == TRUNCATED[mode, max_length]
    assert (result.num_dropped, result.num_truncated) == (2 - len(kept), len(kept))
