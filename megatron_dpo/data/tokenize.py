"""Preference pairs -> token ids with the prompt / completion boundary, as TRL's
DPOTrainer (1.16) makes them.

  * Plain text: the prompt is encoded with the tokenizer's special tokens (BOS
    where the tokenizer adds one); each sequence is ``encode(prompt +
    completion + EOS)``, the EOS text appended unless the completion already
    ends with it.
  * Chat: the template's texts (chat.py), encoded without adding special
    tokens; nothing is appended.
  * The boundary: the prompt length of BOTH sequences is the shorter of the two
    common prefixes, ``encode(prompt)`` vs ``encode(prompt + chosen)`` and vs
    ``encode(prompt + rejected)``. A token merged across the boundary (a
    prompt ending in a space, a newline, mid-word) counts as completion, and
    both sequences then score the same characters.
Only completion tokens are scored (see collate.loss_mask).

Over-length pairs (``data.overlength_policy``, ``data.truncation_mode``):
  * ``drop``: skipped, counted.
  * ``truncate``: prompt tokens are cut first, the same number from both
    sequences, so both keep the same prompt: keep_end cuts the prompt's start
    (after BOS), keep_start its end; once the prompt is down to BOS, the
    completions' ends are cut.
  * ``truncate_sequence``: TRL's. Each sequence is cut to max_length on its own:
    keep_start cuts its end (a pair whose prompt alone fills max_length is
    dropped, as TRL drops it), keep_end cuts its start (prompt first, BOS too).
"""

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

from megatron_dpo.data.chat import render_chat
from megatron_dpo.data.errors import DataError
from megatron_dpo.data.fingerprint import pairs_fingerprint
from megatron_dpo.data.formats import PreferencePair

OVERLENGTH_POLICIES = ("drop", "truncate", "truncate_sequence")
TRUNCATION_MODES = ("keep_end", "keep_start")


@dataclass
class TokenizedPair:
    chosen_ids: list[int]
    rejected_ids: list[int]
    # Number of leading tokens that are prompt; the rest is completion. Equal
    # for both sequences, except after truncate_sequence / keep_end cut them
    # by different amounts.
    chosen_prompt_len: int
    rejected_prompt_len: int
    # Ground-truth rewards from the data (rpo_* losses), or None.
    chosen_reward: Optional[float] = None
    rejected_reward: Optional[float] = None
    # (chosen, rejected) reference log-probs when known before the step
    # (reference.mode cached / none); None: computed online each step.
    reference_logps: Optional[Tuple[float, float]] = None


@dataclass
class TokenizeResult:
    """Tokenized pairs held in memory (cache.TokenizedDataset: the same, memory-mapped)."""

    pairs: list[TokenizedPair]
    num_dropped: int
    num_truncated: int

    @property
    def fingerprint(self) -> str:
        return pairs_fingerprint(self.pairs)

    def set_reference_logps(self, logps) -> None:
        """logps [num_pairs, 2] (chosen, rejected) -> each pair's reference_logps."""
        for pair, (chosen, rejected) in zip(self.pairs, logps.tolist()):
            pair.reference_logps = (chosen, rejected)


def tokenize_pairs(pairs: List[PreferencePair], tokenizer, max_length: int,
                   overlength_policy: str, truncation_mode: str) -> TokenizeResult:
    """Tokenize pairs; over-length pairs are dropped or truncated, never fatal
    unless none is left."""
    check_settings(max_length, overlength_policy, truncation_mode)
    result = tokenize_chunk(pairs, tokenizer, max_length, overlength_policy, truncation_mode)
    check_not_all_dropped(len(result.pairs), result.num_dropped, max_length)
    return result


def check_settings(max_length: int, overlength_policy: str, truncation_mode: str) -> None:
    for key, value, choices in (("overlength_policy", overlength_policy, OVERLENGTH_POLICIES),
                                ("truncation_mode", truncation_mode, TRUNCATION_MODES)):
        if value not in choices:
            raise DataError(f"data.{key}={value!r}; choose one of {list(choices)}")
    if max_length < 2:
        raise DataError(
            f"policy.max_total_sequence_length={max_length} leaves no room for a "
            "completion token; set it to at least 2"
        )


def check_not_all_dropped(num_kept: int, num_dropped: int, max_length: int) -> None:
    if num_kept == 0:
        raise DataError(
            f"all {num_dropped} pairs are too long for max_length={max_length} tokens and were dropped; "
            "raise policy.max_total_sequence_length or set data.overlength_policy=truncate"
        )


def tokenize_chunk(pairs: Sequence[PreferencePair], tokenizer, max_length: int,
                   overlength_policy: str, truncation_mode: str) -> TokenizeResult:
    """Tokenize some pairs (settings already checked); may keep none."""
    result = TokenizeResult(pairs=[], num_dropped=0, num_truncated=0)
    for source, (prompt, chosen, rejected) in zip(pairs, encode_pairs(pairs, tokenizer)):
        prompt_len = min(common_prefix_len(prompt, chosen), common_prefix_len(prompt, rejected))
        pair = TokenizedPair(chosen, rejected, prompt_len, prompt_len, source.chosen_reward, source.rejected_reward)
        if max(len(chosen), len(rejected)) <= max_length:
            result.pairs.append(pair)
            continue
        if overlength_policy == "truncate":
            pair = _truncate_prompt_first(pair, max_length, tokenizer.bos_token_id, truncation_mode)
        elif overlength_policy == "truncate_sequence":
            pair = _truncate_sequence(pair, max_length, truncation_mode)
        else:
            pair = None
        if pair is None:
            result.num_dropped += 1
        else:
            result.pairs.append(pair)
            result.num_truncated += 1
    return result


def encode_pairs(pairs: Sequence[PreferencePair], tokenizer) -> List[Tuple[list, list, list]]:
    """(prompt, prompt + chosen, prompt + rejected) token ids of each pair."""
    plain = [i for i, pair in enumerate(pairs) if isinstance(pair.prompt, str)]
    chat = [i for i, pair in enumerate(pairs) if not isinstance(pair.prompt, str)]
    encoded = [None] * len(pairs)
    if plain:
        eos = _eos_text(tokenizer)
        texts = [(p.prompt, p.prompt + _ends_with(p.chosen, eos), p.prompt + _ends_with(p.rejected, eos))
                 for p in (pairs[i] for i in plain)]
        for i, ids in zip(plain, _encode(tokenizer, texts, add_special_tokens=True)):
            encoded[i] = ids
    if chat:
        texts = [render_chat(pairs[i], tokenizer) for i in chat]
        for i, ids in zip(chat, _encode(tokenizer, texts, add_special_tokens=False)):
            encoded[i] = ids
    return encoded


def _encode(tokenizer, texts: List[Tuple[str, str, str]], add_special_tokens: bool) -> List[Tuple[list, list, list]]:
    flat = [text for triple in texts for text in triple]
    if getattr(tokenizer, "is_fast", False) and not getattr(tokenizer, "split_special_tokens", False):
        # What tokenizer(flat) runs, without building offsets and attention masks.
        backend = tokenizer.backend_tokenizer
        encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
        ids = [encoding.ids for encoding in encode(flat, add_special_tokens=add_special_tokens)]
    else:
        ids = tokenizer(flat, add_special_tokens=add_special_tokens)["input_ids"]
    return [tuple(ids[i:i + 3]) for i in range(0, len(ids), 3)]


def _eos_text(tokenizer) -> str:
    if tokenizer.eos_token is None:
        raise DataError("the tokenizer has no EOS token; set eos_token in its tokenizer_config.json")
    return tokenizer.eos_token


def _ends_with(text: str, eos: str) -> str:
    return text if text.endswith(eos) else text + eos


def common_prefix_len(a: list, b: list) -> int:
    """Binary search over prefix equality: list comparisons run in C."""
    low, high = 0, min(len(a), len(b))  # a[:low] == b[:low]; a[:high + 1] != b[:high + 1]
    while low < high:
        middle = (low + high + 1) // 2
        if a[:middle] == b[:middle]:
            low = middle
        else:
            high = middle - 1
    return low


def _truncate_sequence(pair: TokenizedPair, max_length: int, truncation_mode: str) -> Optional[TokenizedPair]:
    """TRL's DataCollatorForPreference cut, per sequence; None: dropped (keep_start
    and the prompt alone fills max_length, which TRL filters out)."""
    prompt_len = pair.chosen_prompt_len
    if truncation_mode == "keep_start":
        if prompt_len >= max_length:
            return None
        return TokenizedPair(pair.chosen_ids[:max_length], pair.rejected_ids[:max_length], prompt_len, prompt_len,
                             pair.chosen_reward, pair.rejected_reward)
    chosen_cut, rejected_cut = (max(len(ids) - max_length, 0) for ids in (pair.chosen_ids, pair.rejected_ids))
    return TokenizedPair(pair.chosen_ids[chosen_cut:], pair.rejected_ids[rejected_cut:],
                         max(prompt_len - chosen_cut, 0), max(prompt_len - rejected_cut, 0),
                         pair.chosen_reward, pair.rejected_reward)


def _truncate_prompt_first(pair: TokenizedPair, max_length: int, bos_id, truncation_mode: str) -> TokenizedPair:
    """Cut prompt tokens, then the completions' ends.

    keep_end cuts the prompt's start (after BOS), keep_start its end. Both
    sequences lose the same number of prompt tokens (as many as the longer one
    must), so they keep the same prompt part; once a prompt is down to its BOS,
    the completion's end is cut, keeping at least one completion token
    (max_length >= 2).
    """
    keep = 1 if bos_id is not None and pair.chosen_ids[0] == bos_id else 0
    excess = max(len(pair.chosen_ids), len(pair.rejected_ids)) - max_length
    keep_start = truncation_mode == "keep_start"
    chosen, chosen_prompt_len = _cut(pair.chosen_ids, pair.chosen_prompt_len, keep, excess, max_length, keep_start)
    rejected, rejected_prompt_len = _cut(
        pair.rejected_ids, pair.rejected_prompt_len, keep, excess, max_length, keep_start)
    return TokenizedPair(chosen, rejected, chosen_prompt_len, rejected_prompt_len,
                         pair.chosen_reward, pair.rejected_reward)


def _cut(ids: list[int], prompt_len: int, keep: int, excess: int,
         max_length: int, keep_start: bool) -> tuple[list[int], int]:
    cut = max(0, min(excess, prompt_len - keep))
    start = prompt_len - cut if keep_start else keep
    return (ids[:start] + ids[start + cut:])[:max_length], prompt_len - cut
