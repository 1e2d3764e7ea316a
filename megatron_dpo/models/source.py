"""Where ``policy.model_name`` points: a built-in preset, an HF checkpoint
directory, or a megatron_dpo checkpoint (``step_N/``). Resolves the
architecture and tokenizer up front (config validation needs the shapes) and
fills model shards from it later.
"""

import json
import os
from dataclasses import dataclass
from typing import List, Optional

import torch

from megatron_dpo.config.errors import ConfigError
from megatron_dpo.config.schema import PolicyConfig
from megatron_dpo.models import presets, weights
from megatron_dpo.models.architecture import ModelArchitecture
from megatron_dpo.models.conversion import ConversionError, hf_io, llama, registry

ARCH_FILE = "model_arch.json"


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
        tokenizer_path = policy_cfg.tokenizer.name or os.path.join(name, "tokenizer")
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


def check_sequence_length(arch: ModelArchitecture, max_length: int) -> None:
    """Full causal attention equals a sliding window only within the window."""
    if arch.sliding_window is not None and max_length > arch.sliding_window:
        raise ConfigError(
            f"policy.max_total_sequence_length({max_length}) exceeds the model's sliding_window"
            f"({arch.sliding_window}); megatron_dpo uses full attention, which matches sliding-window "
            f"attention only up to the window. Set policy.max_total_sequence_length <= {arch.sliding_window}."
        )


def load_tokenizer(source: ModelSource, chat_template: Optional[str] = None):
    return _load_tokenizer(source.tokenizer_path, chat_template)


def _load_hf_weights(chunks: List[torch.nn.Module], arch: ModelArchitecture, path: str, ctx) -> None:
    checkpoint = hf_io.HFCheckpoint(path)
    checkpoint.check_keys(llama.expected_hf_names(weights.canonical_names(arch)), arch.tie_word_embeddings)
    weights.load_full_weights(chunks, arch, ctx, llama.canonical_from_hf(checkpoint.tensor, arch))


def load_weights(chunks: List[torch.nn.Module], source: ModelSource, ctx, seed: int) -> None:
    """Fill this rank's shards of a freshly built model from the source."""
    if source.kind == "preset":
        weights.init_weights(chunks, source.arch, ctx, seed)
    elif source.kind == "hf":
        _load_hf_weights(chunks, source.arch, source.path, ctx)
    else:
        from megatron_dpo.checkpoint.dist import load_model_weights

        load_model_weights(chunks, os.path.join(source.path, "policy"))
