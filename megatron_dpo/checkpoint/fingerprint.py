"""What a checkpoint was trained on, compared with what a resumed run would use.

A resumed run continues a trajectory only when the model shape, the tokenizer
and the training data are the ones the checkpoint saw. The model shape is
``model_arch.json`` itself; tokenizer and data are summarised as SHA-256
fingerprints stored in ``train_state.json``. The data fingerprint covers the
token ids the model trains on, so it also changes with the chat template,
``policy.max_total_sequence_length`` and ``data.overlength_policy``.
"""

import hashlib
import json
from typing import Dict, List

from megatron_dpo.data.fingerprint import pairs_fingerprint


def tokenizer_fingerprint(tokenizer) -> str:
    described = {
        "vocab": sorted(tokenizer.get_vocab().items()),
        "special_ids": [tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id],
        "chat_template": tokenizer.chat_template,
    }
    return hashlib.sha256(json.dumps(described).encode()).hexdigest()


def data_fingerprint(pairs) -> str:
    """Of a list of TokenizedPair, in order: token ids, prompt lengths and
    ground-truth rewards (not cached reference log-probs: a recomputed cache
    may differ in the last bits). A tokenized data set carries the same value
    as ``.fingerprint``."""
    return pairs_fingerprint(pairs)


def arch_differences(saved: Dict[str, object], current: Dict[str, object]) -> List[str]:
    """``field: checkpoint X, this run Y`` for each architecture field that differs."""
    return [
        f"{name}: checkpoint {saved.get(name)!r}, this run {current.get(name)!r}"
        for name in sorted(set(saved) | set(current))
        if saved.get(name) != current.get(name)
    ]
