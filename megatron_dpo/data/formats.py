"""Preference records -> ``PreferencePair``, in three shapes.

1. Strings, under the keys ``data.prompt_key`` / ``chosen_key`` / ``rejected_key``:
       {"prompt": "What is the capital of France?",
        "chosen": "The capital of France is Paris.", "rejected": "I think it's London."}
2. Chat: the prompt is a list of messages; each completion is an assistant
   message, a list of messages, or a string (one assistant message). Rendered
   with the tokenizer's chat template later (``chat.py``):
       {"prompt": [{"role": "user", "content": "What is ...?"}],
        "chosen": [{"role": "assistant", "content": "Paris."}],
        "rejected": {"role": "assistant", "content": "London."}}
3. NeMo RL's ranked completions, recognised by its ``completions`` key; the
   lower rank is chosen:
       {"context": [messages], "completions": [{"rank": 0, "completion": [messages]},
                                               {"rank": 1, "completion": [messages]}]}
Any shape may carry numeric ``chosen_reward`` / ``rejected_reward``
(ground-truth rewards, needed by the rpo_* losses): on every record of a file
or on none. A string prompt may be empty (prompt-free preference data: the
pair is scored from the first completion token, after BOS where the tokenizer
adds one); completions may not. Every problem is a ``DataError`` naming the
record (``file:line`` or ``file row i``), the key and the fix.
"""

import math
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Tuple, Union

from megatron_dpo.config.schema import DataConfig
from megatron_dpo.data.errors import DataError
from megatron_dpo.data.sources import iter_records

Messages = List[Dict[str, str]]
Text = Union[str, Messages]

REWARD_KEYS = ("chosen_reward", "rejected_reward")
CONTEXT_KEY, COMPLETIONS_KEY = "context", "completions"
_MESSAGE_HINT = "a list of chat messages like [{'role': 'user', 'content': '...'}]"


@dataclass(frozen=True)
class PreferencePair:
    prompt: Text
    chosen: Text
    rejected: Text
    chosen_reward: Optional[float] = None
    rejected_reward: Optional[float] = None
    # The record it came from (file:line or file row i), for later errors.
    where: str = field(default="", compare=False)


def load_pairs(path: str, data_cfg: DataConfig) -> List[PreferencePair]:
    """Every pair of one file or dataset directory (see sources.py)."""
    return list(iter_pairs(path, data_cfg))


def iter_pairs(path: str, data_cfg: DataConfig) -> Iterator[PreferencePair]:
    """The pairs of ``path`` one by one, streamed (see sources.py)."""
    first_with = first_without = None
    for where, record in iter_records(path):
        pair = parse_record(record, where, data_cfg)
        if pair.chosen_reward is None:
            first_without = first_without or pair
        else:
            first_with = first_with or pair
        if first_with and first_without:
            _rewards_on_some(first_without, first_with)
        yield pair


def parse_record(record: object, where: str, data_cfg: DataConfig) -> PreferencePair:
    keys = (data_cfg.prompt_key, data_cfg.chosen_key, data_cfg.rejected_key)
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object with keys {list(keys)}, got {type(record).__name__}")
    if COMPLETIONS_KEY in record:
        prompt, chosen, rejected = _ranked(record, where)
        names = f"the two {COMPLETIONS_KEY!r}"
    else:
        prompt, chosen, rejected = _keyed(record, where, keys)
        names = f"{keys[1]!r} and {keys[2]!r}"
    if chosen == rejected:
        raise DataError(
            f"{where}: {names} are identical, so the pair carries no preference; fix or remove this record"
        )
    return PreferencePair(prompt, chosen, rejected, *_rewards(record, where), where=where)


def _keyed(record: dict, where: str, keys: Tuple[str, str, str]) -> Tuple[Text, Text, Text]:
    prompt_key, chosen_key, rejected_key = keys
    prompt = _present(record, prompt_key, where, keys)
    if isinstance(prompt, str):
        completions = (_string(_present(record, key, where, keys), key, where) for key in (chosen_key, rejected_key))
        return (prompt, *completions)
    prompt = _messages(prompt, prompt_key, where)
    return (prompt, *(_completion(_present(record, key, where, keys), key, where)
                      for key in (chosen_key, rejected_key)))


def _ranked(record: dict, where: str) -> Tuple[Messages, Messages, Messages]:
    """NeMo RL's {"context", "completions": [{"rank", "completion"}, x2]}."""
    if CONTEXT_KEY not in record:
        raise DataError(f"{where}: missing key {CONTEXT_KEY!r} (the prompt messages of a "
                        f"{COMPLETIONS_KEY!r} record, NeMo RL's preference format); add it")
    context = _messages(record[CONTEXT_KEY], CONTEXT_KEY, where)
    completions = record[COMPLETIONS_KEY]
    if not isinstance(completions, list) or len(completions) != 2:
        raise DataError(
            f"{where}: key {COMPLETIONS_KEY!r} must be a list of exactly 2 "
            "{'rank': int, 'completion': [messages]} entries (lower rank = chosen), got "
            f"{len(completions) if isinstance(completions, list) else type(completions).__name__}"
        )
    ranked = sorted((_ranked_completion(entry, f"{COMPLETIONS_KEY}[{i}]", where)
                     for i, entry in enumerate(completions)), key=lambda rank_completion: rank_completion[0])
    if ranked[0][0] == ranked[1][0]:
        raise DataError(f"{where}: both {COMPLETIONS_KEY} have rank {ranked[0][0]}; a tie carries no "
                        "preference. Give the preferred completion the lower rank, or remove this record")
    return context, ranked[0][1], ranked[1][1]


def _ranked_completion(entry: object, key: str, where: str) -> Tuple[int, Messages]:
    if not isinstance(entry, dict) or "completion" not in entry or "rank" not in entry:
        raise DataError(f"{where}: {key} must be an object with keys 'rank' and 'completion', got {entry!r:.80}")
    rank = entry["rank"]
    if isinstance(rank, bool) or not isinstance(rank, int):
        raise DataError(f"{where}: {key}.rank must be an integer (lower = preferred), got {rank!r}")
    return rank, _completion(entry["completion"], f"{key}.completion", where)


def _present(record: dict, key: str, where: str, keys: Tuple[str, str, str]) -> object:
    if key not in record:
        raise DataError(
            f"{where}: missing key {key!r} (keys present: {sorted(record)}); add it or point "
            f"data.prompt_key / data.chosen_key / data.rejected_key (now {list(keys)}) at your column names"
        )
    return record[key]


def _string(value: object, key: str, where: str) -> str:
    if not isinstance(value, str):
        raise DataError(
            f"{where}: key {key!r} must be a string, got {type(value).__name__}; the prompt is a "
            f"string, so the completions are too (for chat data make the prompt {_MESSAGE_HINT})"
        )
    if not value.strip():
        raise DataError(f"{where}: key {key!r} is empty; fill it or remove this record")
    return value


def _completion(value: object, key: str, where: str) -> Messages:
    """A chat completion: a string or one message become a one-message list."""
    if isinstance(value, str):
        return [{"role": "assistant", "content": _string(value, key, where)}]
    return _messages([value] if isinstance(value, dict) else value, key, where)


def _messages(value: object, key: str, where: str) -> Messages:
    if not isinstance(value, list) or not value:
        got = "an empty list" if value == [] else type(value).__name__
        raise DataError(f"{where}: key {key!r} must be a string or {_MESSAGE_HINT}, got {got}")
    for index, message in enumerate(value):
        place = f"{where}: key {key!r} message {index}"
        if not isinstance(message, dict) or not all(isinstance(message.get(k), str) for k in ("role", "content")):
            raise DataError(f"{place} must be an object with string 'role' and 'content', got {message!r:.80}")
        if not message["content"].strip():
            raise DataError(f"{place} has empty 'content'; fill it or remove this record")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _rewards(record: dict, where: str) -> Tuple[Optional[float], Optional[float]]:
    present = [key in record for key in REWARD_KEYS]
    if not any(present):
        return None, None
    if not all(present):
        have, lack = (REWARD_KEYS if present[0] else REWARD_KEYS[::-1])
        raise DataError(f"{where}: has {have!r} but not {lack!r}; give both ground-truth rewards or neither")
    return tuple(_reward(record[key], key, where) for key in REWARD_KEYS)


def _reward(value: object, key: str, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise DataError(f"{where}: key {key!r} must be a finite number, got {value!r}")
    return float(value)


def _rewards_on_some(without: PreferencePair, with_: PreferencePair) -> None:
    raise DataError(
        f"{without.where}: no {REWARD_KEYS[0]!r} / {REWARD_KEYS[1]!r}, but {with_.where} has them; "
        "give every pair of a file ground-truth rewards, or none"
    )
