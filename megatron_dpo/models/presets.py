"""Built-in model presets: tiny Llama-style (dense and MoE) models for CPU demos and tests.

A preset has no pretrained weights: its initial weights are drawn by
``weights.init_weights`` from the run seed, identically for every parallel
layout. Its tokenizer ships with the package and works offline.
"""

import os
from dataclasses import replace

from megatron_dpo.models.architecture import ModelArchitecture

TINY_TOKENIZER_DIR = os.path.join(os.path.dirname(__file__), "presets", "tiny_tokenizer")

# vocab_size is filled in from the tokenizer when the preset is resolved.
PRESETS = {
    "tiny-llama": ModelArchitecture(
        num_layers=4,
        hidden_size=64,
        ffn_hidden_size=176,
        num_attention_heads=4,
        num_query_groups=2,
        vocab_size=0,
        max_position_embeddings=1024,
        rotary_base=10000.0,
        tie_word_embeddings=False,
    ),
    "tiny-llama-tied": ModelArchitecture(
        num_layers=2,
        hidden_size=64,
        ffn_hidden_size=128,
        num_attention_heads=4,
        num_query_groups=4,
        vocab_size=0,
        max_position_embeddings=1024,
        rotary_base=500000.0,
        tie_word_embeddings=True,
    ),
    # Mixture of Experts, Mixtral-style (exports as MixtralForCausalLM).
    "tiny-moe": ModelArchitecture(
        num_layers=2,
        hidden_size=64,
        ffn_hidden_size=64,
        num_attention_heads=4,
        num_query_groups=2,
        vocab_size=0,
        max_position_embeddings=1024,
        rotary_base=10000.0,
        tie_word_embeddings=False,
        num_experts=4,
        moe_ffn_hidden_size=64,
        moe_router_topk=2,
        hf_architecture="MixtralForCausalLM",
    ),
}


def is_preset(name: str) -> bool:
    return name in PRESETS


def preset_architecture(name: str, vocab_size: int) -> ModelArchitecture:
    return replace(PRESETS[name], vocab_size=vocab_size)
