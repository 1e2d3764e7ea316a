"""Stored reference log-probs (``reference.mode=cached``): keys and files.

One directory per data set: ``<cache_dir>/<key>/`` with ``manifest.json`` and
``reference_logps.safetensors`` holding ``logps`` [num_pairs, 2] float32, the
reference's (chosen, rejected) summed completion log-probs in the data set's
pair order. ``cache_dir`` is ``reference.cache_dir``, by default
``<checkpointing.checkpoint_dir>/reference_cache``: a resumed run finds it,
and so does a later run pointed at it.

The key is a SHA-256 of the cache's identity:
  * ``tokens``: the fingerprint of the tokenized pairs (checkpoint.fingerprint).
    It covers everything that decides what the reference reads: the data
    file's content and keys, chat template, tokenizer,
    ``policy.max_total_sequence_length``, ``data.overlength_policy`` and
    ``data.truncation_mode`` (and the ground-truth rewards, which do not
    change the log-probs: editing them recomputes the cache);
  * ``model``: where the reference weights come from: a preset's name, seed and
    architecture; for an HF or megatron_dpo checkpoint directory its path and
    each file's name, size and mtime (hashing many GB of weights on every
    start is too slow; a file rewritten with the same size and mtime goes
    unnoticed);
  * ``precision``, and ``CACHE_VERSION`` (bumped when the computation changes).
The parallel layout and micro-batch size are not keyed: they change the
log-probs by float rounding only (see reference.py).
A cache whose manifest or tensor does not match its key is stale: it is rebuilt.
"""

import hashlib
import json
import os
import shutil
from typing import Optional, Tuple

import torch

from megatron_dpo.config.schema import Config
from megatron_dpo.checkpoint.source import ModelSource

CACHE_VERSION = 1
MANIFEST_FILE = "manifest.json"
LOGPS_FILE = "reference_logps.safetensors"


def cache_root(cfg: Config) -> str:
    return cfg.reference.cache_dir or os.path.join(cfg.checkpointing.checkpoint_dir, "reference_cache")


def model_identity(source: ModelSource, seed: int) -> dict:
    """What the reference weights are made from (see the module docstring)."""
    if source.kind == "preset":
        return {"kind": "preset", "name": source.path, "seed": seed, "arch": source.arch.to_dict()}
    return {"kind": source.kind, **directory_identity(source.path)}


def directory_identity(path: str) -> dict:
    """A directory's path and its files' names, sizes and modification times."""
    root = os.path.abspath(path)
    files = sorted(
        (os.path.relpath(os.path.join(directory, name), root), stat.st_size, stat.st_mtime_ns)
        for directory, _, names in os.walk(root)
        for name in names
        for stat in [os.stat(os.path.join(directory, name))]
    )
    return {"path": root, "files": files}


def cache_identity(data, model: dict, precision: str) -> Tuple[str, dict]:
    """(key, identity) of one data set's cache; ``data``: a tokenized data set
    (its ``fingerprint`` covers every pair's token ids)."""
    identity = {"version": CACHE_VERSION, "tokens": data.fingerprint, "num_pairs": len(data.pairs),
                "model": model, "precision": precision}
    key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:24]
    return key, identity


def load_cache(directory: str, identity: dict) -> Tuple[Optional[torch.Tensor], str]:
    """(logps [N, 2], "") when the cache in ``directory`` matches ``identity``;
    (None, why not) when it is missing or stale."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    manifest_path, logps_path = (os.path.join(directory, name) for name in (MANIFEST_FILE, LOGPS_FILE))
    if not os.path.isfile(manifest_path):
        return None, "missing"
    try:
        with open(manifest_path) as handle:
            manifest = json.load(handle)
        logps = load_file(logps_path)["logps"]
    except (OSError, ValueError, KeyError, SafetensorError) as error:
        return None, f"stale: unreadable ({error})"
    if json.loads(json.dumps(identity)) != manifest.get("identity"):
        return None, "stale: its manifest describes other data, weights or precision"
    if logps.shape != (identity["num_pairs"], 2) or not torch.isfinite(logps).all():
        return None, f"stale: log-probs of shape {tuple(logps.shape)} or not finite"
    return logps, ""


def save_cache(directory: str, identity: dict, logps: torch.Tensor, data_path: str) -> None:
    """Write atomically: a reader sees the complete cache or none."""
    from safetensors.torch import save_file

    tmp = f"{directory}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    save_file({"logps": logps.float().contiguous()}, os.path.join(tmp, LOGPS_FILE))
    with open(os.path.join(tmp, MANIFEST_FILE), "w") as handle:
        json.dump({"identity": identity, "data_path": data_path}, handle, indent=2)
    shutil.rmtree(directory, ignore_errors=True)
    os.replace(tmp, directory)
