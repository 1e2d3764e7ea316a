"""Mistral: Llama's tensors plus sliding-window attention in the config.

megatron_dpo builds full causal attention; it equals Mistral's sliding window
for sequences no longer than ``sliding_window``, and
``models.architecture.check_sequence_length`` refuses
``policy.max_total_sequence_length`` above it.
"""

from megatron_dpo.models.architecture import ModelArchitecture
from megatron_dpo.models.conversion import llama

HF_ARCHITECTURE = "MistralForCausalLM"
MODEL_TYPE = "mistral"


def architecture_from_hf_config(hf_config: dict, source: str) -> ModelArchitecture:
    return ModelArchitecture(**llama.architecture_fields(hf_config, source), sliding_window=hf_config.get("sliding_window"))


def hf_config_from_architecture(arch: ModelArchitecture) -> dict:
    return dict(llama.hf_config_fields(arch), sliding_window=arch.sliding_window)
