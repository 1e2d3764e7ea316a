"""Preference pairs read from JSONL files.

One JSON object per line, e.g.
    {"prompt": "What is the capital of France?",
     "chosen": "The capital of France is Paris.",
     "rejected": "I think it's London."}
The key names come from ``data.prompt_key`` / ``data.chosen_key`` /
``data.rejected_key``. Every problem is reported with file:line and the fix.
"""

import json
import os
from dataclasses import dataclass

from megatron_dpo.config.schema import DataConfig


class DataError(ValueError):
    """A problem with the user's data files or data settings."""


@dataclass(frozen=True)
class PreferencePair:
    prompt: str
    chosen: str
    rejected: str


def load_pairs(path: str, data_cfg: DataConfig) -> list[PreferencePair]:
    """Read every pair of a JSONL file; blank lines are skipped."""
    if not os.path.isfile(path):
        raise DataError(
            f"data file {path!r} does not exist; set data.train_data_path / "
            "data.val_data_path to a JSONL file with one pair per line"
        )
    keys = (data_cfg.prompt_key, data_cfg.chosen_key, data_cfg.rejected_key)
    pairs = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if line.strip():
                pairs.append(_parse_line(line, f"{path}:{line_no}", keys))
    if not pairs:
        raise DataError(
            f"{path} holds no preference pairs; write one JSON object per line "
            f"with the keys {list(keys)}"
        )
    return pairs


def _parse_line(line: str, where: str, keys: tuple[str, str, str]) -> PreferencePair:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(
            f"{where}: not valid JSON ({e}); each line must be one JSON object"
        ) from e
    if not isinstance(row, dict):
        raise DataError(
            f"{where}: expected a JSON object with keys {list(keys)}, "
            f"got {type(row).__name__}"
        )
    prompt, chosen, rejected = (_field(row, key, where, keys) for key in keys)
    if chosen == rejected:
        raise DataError(
            f"{where}: {keys[1]!r} and {keys[2]!r} are identical, so the pair "
            "carries no preference; fix or remove this line"
        )
    return PreferencePair(prompt=prompt, chosen=chosen, rejected=rejected)


def _field(row: dict, key: str, where: str, keys: tuple[str, str, str]) -> str:
    if key not in row:
        raise DataError(
            f"{where}: missing key {key!r} (keys present: {sorted(row)}); add it "
            f"or point data.prompt_key / data.chosen_key / data.rejected_key "
            f"(now {list(keys)}) at your column names"
        )
    value = row[key]
    if not isinstance(value, str):
        raise DataError(
            f"{where}: key {key!r} must be a string, got {type(value).__name__}; "
            "chat-form (list of messages) data is not supported in JSONL yet"
        )
    if not value.strip():
        raise DataError(f"{where}: key {key!r} is empty; fill it or remove this line")
    return value
