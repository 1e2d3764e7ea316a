"""Hugging Face checkpoint directories: lazy safetensors reading, sharded writing.

A directory holds ``config.json`` and either one ``model.safetensors`` or
shards listed in ``model.safetensors.index.json`` (``weight_map``: tensor name
-> file). Tensors are read one at a time, so memory stays at one tensor.
"""

import glob
import json
import os
from typing import Dict, Iterable, List

import torch

from megatron_dpo.models.conversion import ConversionError

CONFIG_FILE = "config.json"
INDEX_FILE = "model.safetensors.index.json"
# Buffers transformers recomputes at load; some older checkpoints store them.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def _listing(names: Iterable[str], limit: int = 10) -> str:
    names = sorted(names)
    more = f" ... and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _read_json(path: str) -> dict:
    try:
        with open(path) as handle:
            return json.load(handle)
    except json.JSONDecodeError as error:
        raise ConversionError(f"{path} is not valid JSON ({error}); re-download or fix the file.") from None


def read_config(path: str) -> dict:
    config_path = os.path.join(path, CONFIG_FILE)
    if not os.path.isfile(config_path):
        raise ConversionError(f"'{path}' has no {CONFIG_FILE}: point to a Hugging Face model directory.")
    return _read_json(config_path)


def _key_to_file(path: str) -> Dict[str, str]:
    index_path = os.path.join(path, INDEX_FILE)
    if os.path.isfile(index_path):
        weight_map = _read_json(index_path).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ConversionError(f"{index_path} has no 'weight_map' (tensor name -> file); re-download it.")
        files = {os.path.join(path, name) for name in weight_map.values()}
        missing = [name for name in files if not os.path.isfile(name)]
        if missing:
            raise ConversionError(f"{index_path} lists missing files: {_listing(missing)}. Re-download the checkpoint.")
        return {key: os.path.join(path, name) for key, name in weight_map.items()}
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        hint = " It holds PyTorch .bin weights: re-save it with save_pretrained(safe_serialization=True)." if glob.glob(
            os.path.join(path, "*.bin")) else ""
        raise ConversionError(f"No *.safetensors files in HF checkpoint directory '{path}'.{hint}")
    return {key: file for file in files for key in _file_keys(file)}


def _file_keys(file: str) -> List[str]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(file, framework="pt") as handle:
            return list(handle.keys())
    except (OSError, SafetensorError) as error:
        raise ConversionError(f"Cannot read {file} ({error}): the file is corrupt or truncated; re-download it.") from error


class HFCheckpoint:
    """Tensors of an HF checkpoint directory, read lazily by name."""

    def __init__(self, path: str):
        self.path = path
        self.key_to_file = _key_to_file(path)

    def tensor(self, key: str) -> torch.Tensor:
        from safetensors import SafetensorError, safe_open

        if key not in self.key_to_file:
            raise ConversionError(f"HF checkpoint '{self.path}' has no tensor '{key}'.")
        file = self.key_to_file[key]
        try:
            with safe_open(file, framework="pt") as handle:
                return handle.get_tensor(key)
        except (OSError, SafetensorError) as error:
            raise ConversionError(f"Cannot read tensor '{key}' from {file} ({error}): re-download the file.") from error

    def dtype(self) -> torch.dtype:
        """The stored dtype, from one row of the first tensor."""
        from safetensors import safe_open

        key = next(iter(self.key_to_file))
        with safe_open(self.key_to_file[key], framework="pt") as handle:
            return handle.get_slice(key)[:1].dtype

    def check_keys(self, expected: List[str], tie_word_embeddings: bool) -> None:
        """The file's tensors must be exactly those the config describes."""
        present = {key for key in self.key_to_file if not key.endswith(_IGNORED_SUFFIXES)}
        if tie_word_embeddings:
            present.discard("lm_head.weight")  # a saved copy of the tied embedding
        missing, unexpected = set(expected) - present, present - set(expected)
        if missing or unexpected:
            raise ConversionError(
                f"HF checkpoint '{self.path}' does not match its {CONFIG_FILE}: "
                f"missing tensors [{_listing(missing)}]; unexpected tensors [{_listing(unexpected)}]. "
                "Check that config.json belongs to these weights (e.g. tie_word_embeddings, "
                "num_hidden_layers, biases)."
            )


def shard_file_name(index: int, num_shards: int) -> str:
    if num_shards == 1:
        return "model.safetensors"
    return f"model-{index + 1:05d}-of-{num_shards:05d}.safetensors"


def save_shard(path: str, tensors: Dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    save_file(tensors, path, metadata={"format": "pt"})


def write_index(out_dir: str, weight_map: Dict[str, str], total_size: int) -> None:
    """The index transformers reads for a multi-file checkpoint (none for one file)."""
    if len(set(weight_map.values())) == 1:
        return
    with open(os.path.join(out_dir, INDEX_FILE), "w") as handle:
        json.dump({"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}, handle, indent=2)
