"""Llama-family Hugging Face checkpoints -> canonical megatron tensors.

Canonical names and layouts are those of ``models.weights``. HF keeps q, k, v
as separate matrices; megatron fuses them per query group:
``linear_qkv = [q_g0; k_g0; v_g0; q_g1; k_g1; v_g1; ...]`` and SwiGLU's
``linear_fc1 = [gate; up]``. Both RoPE layouts are rotate-half.
"""

from typing import Callable

import torch

from megatron_dpo.models.architecture import ModelArchitecture

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM",)


def architecture_from_hf_config(hf_config: dict, source: str) -> ModelArchitecture:
    archs = hf_config.get("architectures") or []
    if not any(arch in SUPPORTED_ARCHITECTURES for arch in archs):
        raise ValueError(
            f"{source}: unsupported architecture {archs}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}."
        )
    rope_scaling = hf_config.get("rope_scaling") or {}
    num_heads = hf_config["num_attention_heads"]
    return ModelArchitecture(
        num_layers=hf_config["num_hidden_layers"],
        hidden_size=hf_config["hidden_size"],
        ffn_hidden_size=hf_config["intermediate_size"],
        num_attention_heads=num_heads,
        num_query_groups=hf_config.get("num_key_value_heads") or num_heads,
        vocab_size=hf_config["vocab_size"],
        max_position_embeddings=hf_config.get("max_position_embeddings", 4096),
        rotary_base=float(hf_config.get("rope_theta", 10000.0)),
        norm_epsilon=hf_config.get("rms_norm_eps", 1e-5),
        tie_word_embeddings=bool(hf_config.get("tie_word_embeddings", False)),
        kv_channels=hf_config.get("head_dim"),
        rope_scaling_factor=rope_scaling.get("factor") if rope_scaling.get("rope_type", rope_scaling.get("type")) == "llama3" else None,
    )


def _fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, arch: ModelArchitecture) -> torch.Tensor:
    groups = arch.num_query_groups
    # [heads*d, ...] -> [groups, rows per group, ...] -> interleave q, k, v per group
    q_G = q.reshape(groups, -1, *q.shape[1:])
    k_G = k.reshape(groups, -1, *k.shape[1:])
    v_G = v.reshape(groups, -1, *v.shape[1:])
    return torch.cat([q_G, k_G, v_G], dim=1).reshape(-1, *q.shape[1:])


def canonical_from_hf(hf_tensor: Callable[[str], torch.Tensor], arch: ModelArchitecture) -> Callable[[str], torch.Tensor]:
    """A function canonical name -> full tensor, reading HF tensors by name."""

    def full_tensor(name: str) -> torch.Tensor:
        if name == "embedding.word_embeddings.weight":
            return hf_tensor("model.embed_tokens.weight")
        if name == "output_layer.weight":
            return hf_tensor("lm_head.weight")
        if name == "decoder.final_layernorm.weight":
            return hf_tensor("model.norm.weight")
        _, _, index, rest = name.split(".", 3)
        hf = f"model.layers.{index}."
        if rest == "input_layernorm.weight":
            return hf_tensor(hf + "input_layernorm.weight")
        if rest == "pre_mlp_layernorm.weight":
            return hf_tensor(hf + "post_attention_layernorm.weight")
        if rest in ("self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias"):
            kind = rest.rsplit(".", 1)[1]
            return _fuse_qkv(*(hf_tensor(f"{hf}self_attn.{p}_proj.{kind}") for p in "qkv"), arch)
        if rest == "self_attention.linear_proj.weight":
            return hf_tensor(hf + "self_attn.o_proj.weight")
        if rest == "mlp.linear_fc1.weight":
            return torch.cat([hf_tensor(hf + "mlp.gate_proj.weight"), hf_tensor(hf + "mlp.up_proj.weight")])
        if rest == "mlp.linear_fc2.weight":
            return hf_tensor(hf + "mlp.down_proj.weight")
        if rest == "self_attention.q_layernorm.weight":
            return hf_tensor(hf + "self_attn.q_norm.weight")
        if rest == "self_attention.k_layernorm.weight":
            return hf_tensor(hf + "self_attn.k_norm.weight")
        raise KeyError(f"No HF tensor maps to megatron parameter {name}")

    return full_tensor
