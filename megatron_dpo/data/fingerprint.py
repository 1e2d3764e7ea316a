"""SHA-256 fingerprints of what the data layer reads and makes.

  * ``pairs_fingerprint``: of tokenized pairs, in order: token ids, prompt
    lengths and ground-truth rewards (not reference log-probs: a recomputed
    reference cache may differ in the last bits). It changes with everything
    that changes what the model trains on (data, keys, chat template,
    tokenizer, max length, overlength policy). Checkpoints record it;
    ``PairHasher`` computes it one pair at a time (the tokenized cache does so
    while building).
  * ``file_fingerprint``: of a data file's bytes, or of every file under a
    dataset directory (relative names and bytes).
  * ``tokenizer_digest``: of a tokenizer's whole definition (vocabulary,
    merges, normalisation, special tokens, chat template).
Both of the last two key the tokenized cache (cache.py).
"""

import hashlib
import json
import os
from array import array

_READ_BYTES = 16 << 20


class PairHasher:
    def __init__(self):
        self._digest = hashlib.sha256()

    def add(self, chosen_ids, rejected_ids, chosen_prompt_len: int, rejected_prompt_len: int,
            chosen_reward, rejected_reward) -> None:
        """Token ids as lists, or int64 numpy arrays (same bytes); rewards may be None."""
        lengths = [len(chosen_ids), len(rejected_ids), chosen_prompt_len, rejected_prompt_len]
        self._digest.update(array("q", lengths).tobytes())
        self._digest.update(_int64_bytes(chosen_ids))
        self._digest.update(_int64_bytes(rejected_ids))
        rewards = [float("nan") if r is None else r for r in (chosen_reward, rejected_reward)]
        self._digest.update(array("d", rewards).tobytes())

    def hexdigest(self) -> str:
        return self._digest.hexdigest()


def _int64_bytes(ids) -> bytes:
    return array("q", ids).tobytes() if isinstance(ids, list) else ids.tobytes()


def pairs_fingerprint(pairs) -> str:
    """Of an iterable of TokenizedPair."""
    hasher = PairHasher()
    for pair in pairs:
        hasher.add(pair.chosen_ids, pair.rejected_ids, pair.chosen_prompt_len, pair.rejected_prompt_len,
                   pair.chosen_reward, pair.rejected_reward)
    return hasher.hexdigest()


def file_fingerprint(path: str) -> str:
    digest = hashlib.sha256()
    if os.path.isdir(path):
        files = sorted(os.path.join(directory, name) for directory, _, names in os.walk(path) for name in names)
    else:
        files = [path]
    for name in files:
        digest.update(os.path.relpath(name, path).encode() + b"\0")
        with open(name, "rb") as handle:
            while block := handle.read(_READ_BYTES):
                digest.update(block)
        digest.update(b"\0")
    return digest.hexdigest()


def tokenizer_digest(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    described = {
        "class": type(tokenizer).__name__,
        "definition": backend.to_str() if backend is not None else sorted(tokenizer.get_vocab().items()),
        "special": [tokenizer.bos_token, tokenizer.eos_token, tokenizer.bos_token_id, tokenizer.eos_token_id],
        "chat_template": tokenizer.chat_template,
    }
    return hashlib.sha256(json.dumps(described, default=str).encode()).hexdigest()
