"""Where ``policy.model_name`` points: a built-in preset, an HF checkpoint
directory, or a megatron_dpo checkpoint (``step_N/``). Resolves the
architecture and tokenizer up front (config validation needs the shapes) and
fills model shards from it later, reading each weight file once.

It lives in ``checkpoint/`` because a megatron_dpo checkpoint is one of the
sources (its file names: checkpoint/files.py; its reader: checkpoint/dist.py).
"""

import json
import os
import pickle
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch

from megatron_dpo.checkpoint.dist import checkpoint_errors, load_model_weights
from megatron_dpo.checkpoint.files import ARCH_FILE, TOKENIZER_DIR, policy_dir
from megatron_dpo.config.errors import ConfigError
from megatron_dpo.config.schema import PolicyConfig
from megatron_dpo.models import presets, weights
from megatron_dpo.models.architecture import ModelArchitecture, check_sequence_length
from megatron_dpo.models.conversion import ConversionError, hf_io, llama, registry
from megatron_dpo.models.known import HF_CONFIGS
from megatron_dpo.parallel.dims import ParallelDims


@dataclass
class ModelSource:
    kind: str  # "preset" | "hf" | "megatron"
    path: str
    arch: ModelArchitecture
    tokenizer_path: str


def _load_tokenizer(path: str, chat_template: Optional[str]):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as error:
        raise ConfigError(
            f"Cannot load a tokenizer from '{path}' (policy.tokenizer.name / policy.model_name): {error}"
        ) from error
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def resolve_source(policy_cfg: PolicyConfig) -> ModelSource:
    source = _resolve(policy_cfg)
    check_sequence_length(source.arch, policy_cfg.max_total_sequence_length)
    return source


def _resolve(policy_cfg: PolicyConfig) -> ModelSource:
    name = policy_cfg.model_name
    if presets.is_preset(name):
        tokenizer_path = policy_cfg.tokenizer.name or presets.TINY_TOKENIZER_DIR
        vocab_size = len(_load_tokenizer(tokenizer_path, None))
        return ModelSource("preset", name, presets.preset_architecture(name, vocab_size), tokenizer_path)
    if os.path.isfile(os.path.join(name, ARCH_FILE)):
        with open(os.path.join(name, ARCH_FILE)) as handle:
            arch = ModelArchitecture.from_dict(json.load(handle))
        tokenizer_path = policy_cfg.tokenizer.name or os.path.join(name, TOKENIZER_DIR)
        return ModelSource("megatron", name, arch, tokenizer_path)
    if os.path.isfile(os.path.join(name, hf_io.CONFIG_FILE)):
        try:
            arch = hf_architecture(name)
        except ConversionError as error:
            raise ConfigError(f"policy.model_name: {error}") from error
        return ModelSource("hf", name, arch, policy_cfg.tokenizer.name or name)
    raise ConfigError(
        f"policy.model_name='{name}' is neither a built-in preset ({', '.join(presets.PRESETS)}), "
        f"an HF checkpoint directory (with config.json), nor a megatron_dpo checkpoint "
        f"(with {ARCH_FILE}). Fix the path or pick a preset."
    )


def hf_architecture(path: str) -> ModelArchitecture:
    return registry.architecture_from_hf_config(hf_io.read_config(path), os.path.join(path, hf_io.CONFIG_FILE))


def load_tokenizer(source: ModelSource, chat_template: Optional[str] = None):
    return _load_tokenizer(source.tokenizer_path, chat_template)


def _load_hf_weights(chunks: List[torch.nn.Module], arch: ModelArchitecture, path: str, dims: ParallelDims) -> None:
    with hf_io.HFCheckpoint(path) as checkpoint:
        checkpoint.check_keys(llama.expected_hf_names(weights.canonical_names(arch), arch), arch.tie_word_embeddings)
        weights.load_full_weights(chunks, arch, dims, llama.canonical_from_hf(checkpoint.tensor, arch))


def load_source_weights(chunks: List[torch.nn.Module], source: ModelSource, dims: ParallelDims, seed: int) -> None:
    """Fill this rank's shards of a freshly built model from the source; each
    weight file is opened once."""
    if source.kind == "preset":
        weights.init_weights(chunks, source.arch, dims, seed)
    elif source.kind == "hf":
        _load_hf_weights(chunks, source.arch, source.path, dims)
    else:
        _load_checkpoint_weights(chunks, source.path)


def _load_checkpoint_weights(chunks: List[torch.nn.Module], path: str) -> None:
    """A megatron_dpo checkpoint as the source: refused by name when its files
    would run code (compat's restricted unpickler) or its weights hold NaN/inf."""
    try:
        load_model_weights(chunks, policy_dir(path))
    except (pickle.UnpicklingError, AssertionError, *checkpoint_errors()) as error:
        # DCP reports a refused or unreadable .metadata as "metadata is None; ..." inside its exception.
        reason = str(error).strip().splitlines()[-1][:2000]
        raise ConfigError(f"policy.model_name={path!r} cannot be loaded: {reason}") from error
    for chunk in chunks:
        for name, param in chunk.named_parameters():
            if not torch.isfinite(param).all():
                raise ConfigError(f"policy.model_name={path!r} holds NaN/inf weights ({name}): it cannot be "
                                  "trained from. Point it at an earlier checkpoint, or at the base model.")


def resolve_architecture(policy_cfg: PolicyConfig) -> Tuple[ModelArchitecture, str]:
    """The architecture ``policy.model_name`` names, and where it came from:
    a preset, a local HF / megatron_dpo directory, or a hub id of
    models.known.HF_CONFIGS (validate-config needs no weights)."""
    name = policy_cfg.model_name
    if name not in HF_CONFIGS or os.path.exists(name):
        try:
            source = resolve_source(policy_cfg)
        except ConfigError as error:
            if os.path.exists(name) or presets.is_preset(name):
                raise
            raise ConfigError(f"{error} validate-config also knows these hub ids (no weights needed): "
                              f"{', '.join(HF_CONFIGS)}.") from None
        return source.arch, f"{source.kind} {name}"
    arch = registry.architecture_from_hf_config(HF_CONFIGS[name], name)
    check_sequence_length(arch, policy_cfg.max_total_sequence_length)
    return arch, f"{name} (known architecture; to train, download it and set policy.model_name to its directory)"
