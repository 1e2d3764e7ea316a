"""The names of everything in a run directory's step directories: one place.

Layout of ``<checkpointing.checkpoint_dir>/step_N/``::

    policy/            dist_checkpointing dir: {"model"|"model0".., "optimizer"}
    train_state.json   step, sampler position, scheduler, counters, fingerprints
    rng_rank{R}.pt     per-rank RNG states (tensors only: torch.load weights_only)
    config.yaml        the resolved config of the run
    model_arch.json    the architecture (lets policy.model_name point here)
    tokenizer/         the tokenizer files
    manifest.json      every other file's size and checksum (checkpoint/manifest.py)

A converted HF model (checkpoint/hf_import.py) has ``policy/``,
``model_arch.json`` and ``tokenizer/`` only. A step directory is written as
``.tmp_step_N/`` and renamed when complete (``manifest.json`` is written
last, just before the rename); a step directory that fails verification or
loading is moved aside as ``step_N.corrupt``.
"""

import os
import re

STEP_DIR = re.compile(r"^step_(\d+)$")
TMP_PREFIX = ".tmp_"
POLICY_DIR = "policy"
TRAIN_STATE_FILE = "train_state.json"
CONFIG_FILE = "config.yaml"
ARCH_FILE = "model_arch.json"
TOKENIZER_DIR = "tokenizer"
MANIFEST_FILE = "manifest.json"
CORRUPT_SUFFIX = ".corrupt"


def step_dir(checkpoint_dir: str, step: int) -> str:
    return os.path.join(checkpoint_dir, f"step_{step}")


def tmp_step_dir(checkpoint_dir: str, step: int) -> str:
    return os.path.join(checkpoint_dir, f"{TMP_PREFIX}step_{step}")


def rng_file(directory: str, rank: int) -> str:
    return os.path.join(directory, f"rng_rank{rank}.pt")


def policy_dir(directory: str) -> str:
    return os.path.join(directory, POLICY_DIR)


def is_complete(directory: str) -> bool:
    """Renamed from its temporary name: train_state.json (and, since manifests
    exist, manifest.json) were written before the rename."""
    return os.path.isfile(os.path.join(directory, TRAIN_STATE_FILE))


def rank_files(directory: str, rank: int):
    """The files of a step directory that ``rank`` wrote itself: its policy
    shards (dist_checkpointing's ``__{rank}_{i}.distcp``) and its RNG file."""
    shards = sorted(f"{POLICY_DIR}/{name}" for name in os.listdir(policy_dir(directory))
                    if name.startswith(f"__{rank}_") and name.endswith(".distcp"))
    return shards + [os.path.basename(rng_file(directory, rank))]


def is_model_dir(directory: str) -> bool:
    """A megatron_dpo checkpoint usable as policy.model_name (a step dir or a conversion)."""
    return os.path.isfile(os.path.join(directory, ARCH_FILE)) and os.path.isdir(policy_dir(directory))
