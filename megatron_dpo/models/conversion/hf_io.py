"""Hugging Face checkpoint directories: lazy safetensors reading, sharded writing.

A directory holds ``config.json`` and either one ``model.safetensors`` or
shards listed in ``model.safetensors.index.json`` (``weight_map``: tensor name
-> file). Tensors are read one at a time, so memory stays at one tensor; each
file is opened once per ``HFCheckpoint``, however many tensors are read from it.
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


# safetensors dtype names -> torch dtypes (https://github.com/huggingface/safetensors, format spec).
_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


class SafetensorsFile:
    """One open ``.safetensors`` file, read tensor by tensor with ``readinto``.

    The format: an 8-byte little-endian header size, a JSON header
    (``{name: {"dtype", "shape", "data_offsets": [begin, end]}}``, offsets
    relative to the end of the header), then the raw bytes. Reading with
    plain file reads instead of safetensors' memory map keeps the process's
    memory at one tensor however many are read through one open file.
    """

    def __init__(self, file: str):
        self.file = file
        try:
            self._handle = open(file, "rb")
            size = os.fstat(self._handle.fileno()).st_size
            header_size = int.from_bytes(self._handle.read(8), "little")
            if not 0 < header_size <= size - 8:
                raise ValueError(f"header size {header_size} does not fit the file's {size} bytes")
            header = json.loads(self._handle.read(header_size))
        except (OSError, ValueError, UnicodeDecodeError) as error:
            raise ConversionError(f"Cannot read {file} ({error}): the file is corrupt or truncated; "
                                  "re-download it.") from error
        header.pop("__metadata__", None)
        self._data_start = 8 + header_size
        self.entries = header
        for key, entry in header.items():
            begin, end = entry["data_offsets"]
            if entry["dtype"] not in _DTYPES or self._data_start + end > size or begin > end:
                raise ConversionError(f"Cannot read tensor '{key}' from {file} (dtype {entry['dtype']}, bytes "
                                      f"{begin}..{end} of {size - self._data_start}): the file is corrupt or "
                                      "truncated; re-download it.")

    def keys(self) -> List[str]:
        return list(self.entries)

    def dtype(self, key: str) -> torch.dtype:
        return _DTYPES[self.entries[key]["dtype"]]

    def tensor(self, key: str) -> torch.Tensor:
        entry = self.entries[key]
        begin, end = entry["data_offsets"]
        data = bytearray(end - begin)
        self._handle.seek(self._data_start + begin)
        if self._handle.readinto(data) != len(data):
            raise ConversionError(f"Cannot read tensor '{key}' from {self.file}: the file is truncated; "
                                  "re-download it.")
        if not data:
            return torch.empty(entry["shape"], dtype=self.dtype(key))
        return torch.frombuffer(data, dtype=self.dtype(key)).reshape(entry["shape"])

    def close(self) -> None:
        self._handle.close()


class HFCheckpoint:
    """Tensors of an HF checkpoint directory, read lazily by name. A context
    manager: each file is opened once, on first use, and closed with it."""

    def __init__(self, path: str):
        self.path = path
        self._files: Dict[str, SafetensorsFile] = {}
        try:
            self.key_to_file = self._key_to_file()
        except ConversionError:
            self.close()
            raise

    def __enter__(self) -> "HFCheckpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for handle in self._files.values():
            handle.close()
        self._files.clear()

    def _file(self, file: str) -> SafetensorsFile:
        if file not in self._files:
            self._files[file] = SafetensorsFile(file)
        return self._files[file]

    def _key_to_file(self) -> Dict[str, str]:
        path = self.path
        index_path = os.path.join(path, INDEX_FILE)
        if os.path.isfile(index_path):
            weight_map = _read_json(index_path).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ConversionError(f"{index_path} has no 'weight_map' (tensor name -> file); re-download it.")
            files = {os.path.join(path, name) for name in weight_map.values()}
            missing = [name for name in files if not os.path.isfile(name)]
            if missing:
                raise ConversionError(
                    f"{index_path} lists missing files: {_listing(missing)}. Re-download the checkpoint.")
            return {key: os.path.join(path, name) for key, name in weight_map.items()}
        files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
        if not files:
            hint = " It holds PyTorch .bin weights: re-save it with save_pretrained(safe_serialization=True)." if glob.glob(
                os.path.join(path, "*.bin")) else ""
            raise ConversionError(f"No *.safetensors files in HF checkpoint directory '{path}'.{hint}")
        return {key: file for file in files for key in self._file(file).keys()}

    def tensor(self, key: str) -> torch.Tensor:
        if key not in self.key_to_file:
            raise ConversionError(f"HF checkpoint '{self.path}' has no tensor '{key}'.")
        handle = self._file(self.key_to_file[key])
        if key not in handle.entries:
            raise ConversionError(f"{INDEX_FILE} of '{self.path}' maps '{key}' to {handle.file}, which does not "
                                  "hold it. Re-download the checkpoint.")
        return handle.tensor(key)

    def dtype(self) -> torch.dtype:
        """The stored dtype of the first tensor."""
        key = next(iter(self.key_to_file))
        return self._file(self.key_to_file[key]).dtype(key)

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
