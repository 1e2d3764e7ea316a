"""Qwen3 (dense): Llama's tensors plus RMSNorm on each head's queries and keys
(``qk_layernorm``, applied before RoPE in both) and an explicit ``head_dim``."""

from megatron_dpo.models.architecture import ModelArchitecture
from megatron_dpo.models.conversion import llama
from megatron_dpo.models.conversion.qwen2 import check_full_attention

HF_ARCHITECTURE = "Qwen3ForCausalLM"
MODEL_TYPE = "qwen3"


def architecture_from_hf_config(hf_config: dict, source: str) -> ModelArchitecture:
    check_full_attention(hf_config, source)
    # transformers' Qwen3Config defaults head_dim to 128, not hidden / heads.
    head_dim = llama.kv_channels(hf_config.get("head_dim", 128), hf_config["hidden_size"], hf_config["num_attention_heads"])
    return ModelArchitecture(**dict(llama.architecture_fields(hf_config, source), kv_channels=head_dim), qk_layernorm=True)


def hf_config_from_architecture(arch: ModelArchitecture) -> dict:
    return dict(llama.hf_config_fields(arch), use_sliding_window=False)
