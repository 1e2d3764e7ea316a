"""Mixtral: Mistral's attention with a Mixture-of-Experts MLP in every layer.

HF ``block_sparse_moe``: a router ``gate`` [experts, hidden] and per expert
SwiGLU ``w1`` (gate), ``w3`` (up), ``w2`` (down) of ``intermediate_size``;
top-``num_experts_per_tok`` routing with softmax over the chosen logits, which
is megatron's default router (``moe_router_pre_softmax=False``). Tensor names
map through ``llama`` (``MOE_HF_NAMES``).
"""

from megatron_dpo.models.architecture import ModelArchitecture
from megatron_dpo.models.conversion import llama

HF_ARCHITECTURE = "MixtralForCausalLM"
MODEL_TYPE = "mixtral"


def architecture_from_hf_config(hf_config: dict, source: str) -> ModelArchitecture:
    if hf_config.get("router_jitter_noise"):
        llama.refuse(source, "router_jitter_noise", hf_config["router_jitter_noise"],
                     "megatron_dpo routes without jitter; set it to 0.0 in config.json.")
    return ModelArchitecture(
        **llama.architecture_fields(hf_config, source), sliding_window=hf_config.get("sliding_window"),
        num_experts=hf_config["num_local_experts"], moe_ffn_hidden_size=hf_config["intermediate_size"],
        moe_router_topk=hf_config["num_experts_per_tok"],
    )


def hf_config_from_architecture(arch: ModelArchitecture) -> dict:
    return dict(llama.hf_config_fields(arch), intermediate_size=arch.moe_ffn_hidden_size,
                sliding_window=arch.sliding_window, num_local_experts=arch.num_experts,
                num_experts_per_tok=arch.moe_router_topk, router_jitter_noise=0.0)
