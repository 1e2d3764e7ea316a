"""Preference pairs -> token ids with the prompt / completion boundary.

The convention shared by TRL and NeMo RL:
  * the prompt is encoded with the tokenizer's special tokens (BOS where the
    tokenizer adds one, as Llama's does);
  * each sequence is ``encode(prompt + completion)`` and ends with exactly one
    EOS (appended unless the encoded text already ends with it);
  * the completion is what follows the longest common prefix of
    ``encode(prompt)`` and ``encode(prompt + completion)``, so a token merged
    across the boundary counts as completion.
Only completion tokens are scored (see collate.loss_mask).
Over-length pairs are dropped or truncated (``data.overlength_policy``); a
truncated prompt keeps its end or its start (``data.truncation_mode``).
"""

from dataclasses import dataclass
from typing import Optional, Tuple

from megatron_dpo.data.errors import DataError
from megatron_dpo.data.formats import PreferencePair

OVERLENGTH_POLICIES = ("drop", "truncate")
TRUNCATION_MODES = ("keep_end", "keep_start")


@dataclass
class TokenizedPair:
    chosen_ids: list[int]
    rejected_ids: list[int]
    # Number of leading tokens that are prompt; the rest is completion + EOS.
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
    pairs: list[TokenizedPair]
    num_dropped: int
    num_truncated: int


def tokenize_pairs(pairs: list[PreferencePair], tokenizer, max_length: int,
                   overlength_policy: str, truncation_mode: str) -> TokenizeResult:
    """Tokenize string pairs; over-length pairs are dropped or truncated, never fatal."""
    for key, value, choices in (("overlength_policy", overlength_policy, OVERLENGTH_POLICIES),
                                ("truncation_mode", truncation_mode, TRUNCATION_MODES)):
        if value not in choices:
            raise DataError(f"data.{key}={value!r}; choose one of {list(choices)}")
    if max_length < 2:
        raise DataError(
            f"policy.max_total_sequence_length={max_length} leaves no room for a "
            "completion token; set it to at least 2"
        )
    eos_id = tokenizer.eos_token_id
    if eos_id is None:
        raise DataError("the tokenizer has no EOS token; set eos_token in its tokenizer_config.json")
    prompt_ids = _encode(tokenizer, [p.prompt for p in pairs])
    chosen_ids = _encode(tokenizer, [p.prompt + p.chosen for p in pairs])
    rejected_ids = _encode(tokenizer, [p.prompt + p.rejected for p in pairs])
    result = TokenizeResult(pairs=[], num_dropped=0, num_truncated=0)
    for source, prompt, chosen, rejected in zip(pairs, prompt_ids, chosen_ids, rejected_ids):
        pair = TokenizedPair(
            chosen_ids=_with_eos(chosen, eos_id),
            rejected_ids=_with_eos(rejected, eos_id),
            chosen_prompt_len=_common_prefix_len(prompt, chosen),
            rejected_prompt_len=_common_prefix_len(prompt, rejected),
            chosen_reward=source.chosen_reward,
            rejected_reward=source.rejected_reward,
        )
        if max(len(pair.chosen_ids), len(pair.rejected_ids)) <= max_length:
            result.pairs.append(pair)
        elif overlength_policy == "drop":
            result.num_dropped += 1
        else:
            result.pairs.append(_truncate(pair, max_length, tokenizer.bos_token_id, truncation_mode))
            result.num_truncated += 1
    if not result.pairs:
        raise DataError(
            f"all {len(pairs)} pairs are longer than max_length={max_length} tokens "
            "and were dropped; raise policy.max_total_sequence_length or set "
            "data.overlength_policy=truncate"
        )
    return result


def _encode(tokenizer, texts: list[str]) -> list[list[int]]:
    return tokenizer(texts, add_special_tokens=True)["input_ids"]


def _with_eos(ids: list[int], eos_id: int) -> list[int]:
    return ids if ids and ids[-1] == eos_id else ids + [eos_id]


def _common_prefix_len(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _truncate(pair: TokenizedPair, max_length: int, bos_id, truncation_mode: str) -> TokenizedPair:
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
