"""HF ``architectures`` name -> the module that converts that family.

A family module provides ``HF_ARCHITECTURE``, ``MODEL_TYPE`` (transformers'
model_type), ``architecture_from_hf_config(hf_config, source)`` and
``hf_config_from_architecture(arch)``; tensors map through ``llama``.
"""

from types import ModuleType

from megatron_dpo.models.architecture import ModelArchitecture
from megatron_dpo.models.conversion import ConversionError, llama, mistral, mixtral, qwen2, qwen3, qwen3_moe

FAMILIES = {module.HF_ARCHITECTURE: module for module in (llama, mistral, qwen2, qwen3, mixtral, qwen3_moe)}


def family(hf_architecture: str, source: str) -> ModuleType:
    if hf_architecture not in FAMILIES:
        raise ConversionError(
            f"{source}: unsupported architecture {hf_architecture!r}; supported: {', '.join(FAMILIES)}."
        )
    return FAMILIES[hf_architecture]


def architecture_from_hf_config(hf_config: dict, source: str) -> ModelArchitecture:
    """The ModelArchitecture of an HF config.json (``source`` names it in errors)."""
    names = hf_config.get("architectures") or []
    if len(names) != 1:
        raise ConversionError(
            f"{source}: 'architectures' must name one model class, got {names}; supported: {', '.join(FAMILIES)}."
        )
    try:
        return family(names[0], source).architecture_from_hf_config(hf_config, source)
    except KeyError as error:
        raise ConversionError(f"{source}: missing config key {error}.") from error


def hf_config_from_architecture(arch: ModelArchitecture) -> dict:
    """transformers config kwargs (with ``model_type``) for an architecture."""
    module = family(arch.hf_architecture, "model_arch.json")
    return dict(module.hf_config_from_architecture(arch), model_type=module.MODEL_TYPE)
