"""Qwen2 / Qwen2.5: Llama's tensors plus q/k/v biases (``add_qkv_bias``)."""

from megatron_dpo.models.architecture import ModelArchitecture
from megatron_dpo.models.conversion import llama

HF_ARCHITECTURE = "Qwen2ForCausalLM"
MODEL_TYPE = "qwen2"


def check_full_attention(hf_config: dict, source: str) -> None:
    """Qwen's per-layer sliding window (max_window_layers) is not built; the
    released checkpoints leave it off."""
    if hf_config.get("use_sliding_window"):
        llama.refuse(source, "use_sliding_window", True, "Set it to false in config.json (full attention).")


def architecture_from_hf_config(hf_config: dict, source: str) -> ModelArchitecture:
    check_full_attention(hf_config, source)
    return ModelArchitecture(**llama.architecture_fields(hf_config, source), add_qkv_bias=True)


def hf_config_from_architecture(arch: ModelArchitecture) -> dict:
    return dict(llama.hf_config_fields(arch), use_sliding_window=False)
