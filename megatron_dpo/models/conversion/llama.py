"""Llama (2, 3.x) Hugging Face checkpoints <-> canonical megatron tensors.

Canonical names and layouts are those of ``models.weights``. HF keeps q, k, v
as separate matrices; megatron fuses them per query group:
``linear_qkv = [q_g0; k_g0; v_g0; q_g1; k_g1; v_g1; ...]`` and SwiGLU's
``linear_fc1 = [gate; up]``. Both RoPE layouts are rotate-half.

Mistral, Qwen2 and Qwen3 keep Llama's HF tensor names, so the tensor mapping
here serves every family of ``registry``; their modules translate configs
only, starting from ``architecture_fields`` / ``hf_config_fields``. The MoE
families (Mixtral, Qwen3-MoE) keep them for attention and norms; their MoE
block's names (``MOE_HF_NAMES``) differ per family.
"""

import re
from typing import Callable, Dict, Iterable, List, Optional, Tuple

import torch

from megatron_dpo.models.architecture import ModelArchitecture
from megatron_dpo.models.conversion import ConversionError

HF_ARCHITECTURE = "LlamaForCausalLM"
MODEL_TYPE = "llama"

# megatron-core 0.16.1 RotaryEmbedding._apply_scaling hard-codes these; a
# "llama3" rope_scaling with other values would give different frequencies.
MEGATRON_LLAMA3_ROPE = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}

_GLOBAL = {
    "embedding.word_embeddings.weight": "model.embed_tokens.weight",
    "output_layer.weight": "lm_head.weight",
    "decoder.final_layernorm.weight": "model.norm.weight",
}
# Per layer: canonical suffix -> HF suffixes under model.layers.{i}. (several: fused)
_PER_LAYER: Dict[str, Tuple[str, ...]] = {
    "input_layernorm.weight": ("input_layernorm.weight",),
    "pre_mlp_layernorm.weight": ("post_attention_layernorm.weight",),
    "self_attention.linear_qkv.weight": ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
    "self_attention.linear_qkv.bias": ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"),
    "self_attention.linear_proj.weight": ("self_attn.o_proj.weight",),
    "self_attention.q_layernorm.weight": ("self_attn.q_norm.weight",),
    "self_attention.k_layernorm.weight": ("self_attn.k_norm.weight",),
    "mlp.linear_fc1.weight": ("mlp.gate_proj.weight", "mlp.up_proj.weight"),
    "mlp.linear_fc2.weight": ("mlp.down_proj.weight",),
}


# MoE block per HF architecture: (block module, expert gate, up, down).
# Router: {block}.gate.weight; expert e: {block}.experts.{e}.{gate|up|down}.weight.
MOE_HF_NAMES = {
    "MixtralForCausalLM": ("block_sparse_moe", "w1", "w3", "w2"),
    "Qwen3MoeForCausalLM": ("mlp", "gate_proj", "up_proj", "down_proj"),
}
_EXPERT = re.compile(r"mlp\.experts\.local_experts\.(\d+)\.(linear_fc[12])\.weight")


def _moe_hf_suffixes(rest: str, arch: Optional[ModelArchitecture]) -> Optional[Tuple[str, ...]]:
    expert = _EXPERT.fullmatch(rest)
    if rest != "mlp.router.weight" and not expert:
        return None
    if arch is None or arch.hf_architecture not in MOE_HF_NAMES:
        raise KeyError(f"megatron MoE parameter {rest} has no HF name for {arch and arch.hf_architecture}")
    block, gate, up, down = MOE_HF_NAMES[arch.hf_architecture]
    if not expert:
        return (f"{block}.gate.weight",)
    index, linear = expert.groups()
    projections = (gate, up) if linear == "linear_fc1" else (down,)
    return tuple(f"{block}.experts.{index}.{name}.weight" for name in projections)


def hf_names(canonical: str, arch: Optional[ModelArchitecture] = None) -> Tuple[str, ...]:
    """The HF tensors that make up one canonical tensor (q, k, v / gate, up when
    fused); MoE tensors need ``arch`` (their names differ per family)."""
    if canonical in _GLOBAL:
        return (_GLOBAL[canonical],)
    _, _, index, rest = canonical.split(".", 3)
    suffixes = _PER_LAYER.get(rest) or _moe_hf_suffixes(rest, arch)
    if suffixes is None:
        raise KeyError(f"No HF tensor maps to megatron parameter {canonical}")
    return tuple(f"model.layers.{index}.{suffix}" for suffix in suffixes)


def expected_hf_names(canonical_names: Iterable[str], arch: Optional[ModelArchitecture] = None) -> List[str]:
    return [hf for name in canonical_names for hf in hf_names(name, arch)]


def _group_rows(tensor: torch.Tensor, groups: int) -> torch.Tensor:
    # [heads*d, ...] -> [groups, rows per group, ...]
    return tensor.reshape(groups, -1, *tensor.shape[1:])


def fuse(canonical: str, hf_tensors: List[torch.Tensor], arch: ModelArchitecture) -> torch.Tensor:
    """HF tensors (in ``hf_names`` order) -> the canonical full tensor."""
    if len(hf_tensors) == 1:
        return hf_tensors[0]
    if ".linear_qkv." in canonical:
        q, k, v = (_group_rows(t, arch.num_query_groups) for t in hf_tensors)
        return torch.cat([q, k, v], dim=1).reshape(-1, *hf_tensors[0].shape[1:])
    return torch.cat(hf_tensors)  # fc1 = [gate; up]


def split(canonical: str, full: torch.Tensor, arch: ModelArchitecture) -> List[torch.Tensor]:
    """Inverse of ``fuse``: the canonical full tensor -> HF tensors in ``hf_names``
    order, each with its own storage (safetensors refuses tensors sharing one)."""
    if ".linear_qkv." in canonical:
        q_rows = arch.num_attention_heads // arch.num_query_groups * arch.head_dim
        parts = _group_rows(full, arch.num_query_groups).split([q_rows, arch.head_dim, arch.head_dim], dim=1)
        return [t.clone(memory_format=torch.contiguous_format).reshape(-1, *full.shape[1:]) for t in parts]
    if canonical.endswith("linear_fc1.weight"):
        return [t.clone() for t in full.chunk(2)]
    return [full]


def canonical_from_hf(hf_tensor: Callable[[str], torch.Tensor], arch: ModelArchitecture) -> Callable[[str], torch.Tensor]:
    """A function canonical name -> full tensor, reading HF tensors by name."""
    return lambda name: fuse(name, [hf_tensor(hf) for hf in hf_names(name, arch)], arch)


def hf_from_canonical(name: str, full: torch.Tensor, arch: ModelArchitecture) -> List[Tuple[str, torch.Tensor]]:
    return list(zip(hf_names(name, arch), split(name, full, arch)))


# -- configs ------------------------------------------------------------------
def rope_parameters(hf_config: dict) -> dict:
    """RoPE settings: transformers 5 keeps them (and rope_theta) in
    ``rope_parameters``, 4.x in ``rope_scaling`` + ``rope_theta``."""
    params = dict(hf_config.get("rope_scaling") or {})
    params.update(hf_config.get("rope_parameters") or {})
    params.setdefault("rope_theta", hf_config.get("rope_theta") or 10000.0)
    params["rope_type"] = params.get("rope_type", params.get("type", "default"))
    return params


def refuse(source: str, key: str, value, fix: str) -> None:
    raise ConversionError(f"{source}: {key}={value!r} is not supported. {fix}")


def kv_channels(head_dim, hidden_size: int, num_heads: int):
    """ModelArchitecture.kv_channels: None where head_dim is the default hidden / heads."""
    return None if head_dim in (None, hidden_size // num_heads) else head_dim


def architecture_fields(hf_config: dict, source: str, rope_types=("default",)) -> dict:
    """ModelArchitecture fields every Llama-style family shares."""
    if hf_config.get("hidden_act", "silu") != "silu":
        refuse(source, "hidden_act", hf_config["hidden_act"], "megatron_dpo builds SwiGLU (silu) MLPs only.")
    for key in ("attention_bias", "mlp_bias"):
        if hf_config.get(key):
            refuse(source, key, True, "Linear-layer biases are supported only as Qwen2's q/k/v biases.")
    rope = rope_parameters(hf_config)
    if rope["rope_type"] not in rope_types:
        refuse(source, "rope type", rope["rope_type"], f"Supported for {hf_config['architectures'][0]}: {', '.join(rope_types)}.")
    num_heads = hf_config["num_attention_heads"]
    return dict(
        num_layers=hf_config["num_hidden_layers"],
        hidden_size=hf_config["hidden_size"],
        ffn_hidden_size=hf_config["intermediate_size"],
        num_attention_heads=num_heads,
        num_query_groups=hf_config.get("num_key_value_heads") or num_heads,
        vocab_size=hf_config["vocab_size"],
        max_position_embeddings=hf_config.get("max_position_embeddings", 4096),
        rotary_base=float(rope["rope_theta"]),
        norm_epsilon=hf_config.get("rms_norm_eps", 1e-5),
        tie_word_embeddings=bool(hf_config.get("tie_word_embeddings", False)),
        kv_channels=kv_channels(hf_config.get("head_dim"), hf_config["hidden_size"], num_heads),
        hf_architecture=hf_config["architectures"][0],
    )


def hf_config_fields(arch: ModelArchitecture) -> dict:
    """transformers config kwargs every Llama-style family shares (4.x names;
    transformers 5 folds rope_theta / rope_scaling into rope_parameters)."""
    return dict(
        architectures=[arch.hf_architecture],
        vocab_size=arch.vocab_size,
        hidden_size=arch.hidden_size,
        intermediate_size=arch.ffn_hidden_size,
        num_hidden_layers=arch.num_layers,
        num_attention_heads=arch.num_attention_heads,
        num_key_value_heads=arch.num_query_groups,
        head_dim=arch.head_dim,
        max_position_embeddings=arch.max_position_embeddings,
        rope_theta=arch.rotary_base,
        rope_scaling=None,
        rms_norm_eps=arch.norm_epsilon,
        tie_word_embeddings=arch.tie_word_embeddings,
        hidden_act="silu",
    )


def architecture_from_hf_config(hf_config: dict, source: str) -> ModelArchitecture:
    fields = architecture_fields(hf_config, source, rope_types=("default", "llama3"))
    rope = rope_parameters(hf_config)
    if rope["rope_type"] == "llama3":
        for key, value in MEGATRON_LLAMA3_ROPE.items():
            if float(rope.get(key, value)) != value:
                refuse(source, f"rope_scaling.{key}", rope.get(key), f"megatron-core's llama3 RoPE scaling fixes it to {value}.")
        fields["rope_scaling_factor"] = float(rope["factor"])
    return ModelArchitecture(**fields)


def hf_config_from_architecture(arch: ModelArchitecture) -> dict:
    fields = hf_config_fields(arch)
    if arch.rope_scaling_factor is not None:
        fields["rope_scaling"] = dict(MEGATRON_LLAMA3_ROPE, rope_type="llama3", factor=arch.rope_scaling_factor)
    return fields
