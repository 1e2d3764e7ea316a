"""reference_cache: what keys a cache, and that a stale one is never used."""

import json
import os

import torch

from megatron_dpo.checkpoint.source import ModelSource
from megatron_dpo.data import TokenizedPair, TokenizeResult
from megatron_dpo.models.presets import preset_architecture
from megatron_dpo.train.reference_cache import (
    LOGPS_FILE, MANIFEST_FILE, cache_identity, load_cache, model_identity, save_cache,
)

PAIRS = TokenizeResult([TokenizedPair([1, 5, 2], [1, 6, 2], 2, 2), TokenizedPair([1, 7, 7, 2], [1, 8, 2], 2, 2)],
                       num_dropped=0, num_truncated=0)
PRESET = ModelSource("preset", "tiny-llama", preset_architecture("tiny-llama", 768), "unused")


def test_key_follows_tokens_weights_and_precision():
    model = model_identity(PRESET, seed=1)
    key, _ = cache_identity(PAIRS, model, "float32")
    same = TokenizeResult([TokenizedPair([1, 5, 2], [1, 6, 2], 2, 2), PAIRS.pairs[1]], 0, 0)
    assert key == cache_identity(same, model, "float32")[0]
    # A different prompt boundary.
    other_tokens = TokenizeResult([TokenizedPair([1, 5, 2], [1, 6, 2], 1, 2), PAIRS.pairs[1]], 0, 0)
    assert len({key, cache_identity(other_tokens, model, "float32")[0],
                cache_identity(PAIRS, model_identity(PRESET, seed=2), "float32")[0],
                cache_identity(PAIRS, model, "bfloat16")[0]}) == 4


def test_checkpoint_weights_are_identified_by_file_size_and_mtime(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"1234")
    source = ModelSource("hf", str(tmp_path), PRESET.arch, str(tmp_path))
    before = model_identity(source, seed=0)
    assert before == model_identity(source, seed=1)  # the seed only matters for presets
    (tmp_path / "model.safetensors").write_bytes(b"12345")
    assert model_identity(source, seed=0) != before


def test_roundtrip_and_stale_caches_are_refused(tmp_path):
    key, identity = cache_identity(PAIRS, model_identity(PRESET, seed=1), "float32")
    directory = str(tmp_path / key)
    assert load_cache(directory, identity) == (None, "missing")
    logps = torch.tensor([[-1.5, -2.25], [-3.0, -4.125]])
    save_cache(directory, identity, logps, "train.jsonl")
    loaded, why_not = load_cache(directory, identity)
    assert why_not == "" and torch.equal(loaded, logps)
    assert os.listdir(tmp_path) == [key]  # no temporary directory left behind

    _, other = cache_identity(PAIRS, model_identity(PRESET, seed=2), "float32")
    assert load_cache(directory, other)[1].startswith("stale: its manifest describes other data")
    save_cache(directory, identity, logps[:1], "train.jsonl")
    assert load_cache(directory, identity)[1] == "stale: log-probs of shape (1, 2) or not finite"
    with open(os.path.join(directory, LOGPS_FILE), "wb") as handle:
        handle.write(b"truncated")
    assert load_cache(directory, identity)[1].startswith("stale: unreadable")
    with open(os.path.join(directory, MANIFEST_FILE)) as handle:
        assert json.load(handle)["data_path"] == "train.jsonl"
