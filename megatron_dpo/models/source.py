"""Where ``policy.model_name`` points: a built-in preset, an HF checkpoint
directory, or a megatron_dpo checkpoint (``step_N/``). Resolves the
architecture and tokenizer up front (config validation needs the shapes) and
fills model shards from it later.
"""

import glob
import json
import os
from dataclasses import dataclass
from typing import List, Optional

import torch

from megatron_dpo.config.errors import ConfigError
from megatron_dpo.config.schema import PolicyConfig
from megatron_dpo.models import presets, weights
from megatron_dpo.models.architecture import ModelArchitecture
from megatron_dpo.models.conversion import llama

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
    if os.path.isfile(os.path.join(name, "config.json")):
        with open(os.path.join(name, "config.json")) as handle:
            hf_config = json.load(handle)
        try:
            arch = llama.architecture_from_hf_config(hf_config, os.path.join(name, "config.json"))
        except ValueError as error:
            raise ConfigError(f"policy.model_name: {error}") from error
        return ModelSource("hf", name, arch, policy_cfg.tokenizer.name or name)
    raise ConfigError(
        f"policy.model_name='{name}' is neither a built-in preset ({', '.join(presets.PRESETS)}), "
        f"an HF checkpoint directory (with config.json), nor a megatron_dpo checkpoint "
        f"(with {ARCH_FILE}). Fix the path or pick a preset."
    )


def load_tokenizer(source: ModelSource, chat_template: Optional[str] = None):
    return _load_tokenizer(source.tokenizer_path, chat_template)


def _hf_tensor_reader(path: str):
    from safetensors import safe_open

    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise ConfigError(f"No *.safetensors files in HF checkpoint directory '{path}' (policy.model_name).")
    key_to_file = {}
    for file in files:
        with safe_open(file, framework="pt") as handle:
            for key in handle.keys():
                key_to_file[key] = file

    def read(key: str) -> torch.Tensor:
        if key not in key_to_file:
            raise ValueError(f"HF checkpoint '{path}' has no tensor '{key}'")
        with safe_open(key_to_file[key], framework="pt") as handle:
            return handle.get_tensor(key).float()

    return read


def load_weights(chunks: List[torch.nn.Module], source: ModelSource, ctx, seed: int) -> None:
    """Fill this rank's shards of a freshly built model from the source."""
    if source.kind == "preset":
        weights.init_weights(chunks, source.arch, ctx, seed)
    elif source.kind == "hf":
        reader = llama.canonical_from_hf(_hf_tensor_reader(source.path), source.arch)
        weights.load_full_weights(chunks, source.arch, ctx, reader)
    else:
        from megatron_dpo.checkpoint.dist import load_model_weights

        load_model_weights(chunks, os.path.join(source.path, "policy"))
