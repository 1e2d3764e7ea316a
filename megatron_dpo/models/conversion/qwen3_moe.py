"""Qwen3-MoE: Qwen3's attention (q/k RMSNorm, explicit ``head_dim``) with a
Mixture-of-Experts MLP in every layer.

HF ``mlp``: a router ``gate`` [experts, hidden] and per expert SwiGLU
``gate_proj``, ``up_proj``, ``down_proj`` of ``moe_intermediate_size``; no
shared expert. ``norm_topk_prob=true`` (the released checkpoints)
renormalises the top-k softmax probabilities, which equals megatron's softmax
over the top-k logits; ``false`` keeps the full softmax's top-k
(``moe_router_pre_softmax``). Dense layers (``mlp_only_layers``,
``decoder_sparse_step`` > 1) are not built. Tensor names map through ``llama``.
"""

from megatron_dpo.models.architecture import ModelArchitecture
from megatron_dpo.models.conversion import llama, qwen3

HF_ARCHITECTURE = "Qwen3MoeForCausalLM"
MODEL_TYPE = "qwen3_moe"


def architecture_from_hf_config(hf_config: dict, source: str) -> ModelArchitecture:
    if hf_config.get("mlp_only_layers") or hf_config.get("decoder_sparse_step", 1) != 1:
        llama.refuse(source, "mlp_only_layers / decoder_sparse_step",
                     (hf_config.get("mlp_only_layers"), hf_config.get("decoder_sparse_step")),
                     "megatron_dpo builds an MoE MLP in every layer: mlp_only_layers=[] and decoder_sparse_step=1.")
    # transformers 5 writes num_local_experts; the released config.json files num_experts.
    num_experts = hf_config.get("num_experts") or hf_config["num_local_experts"]
    dense = qwen3.architecture_from_hf_config(hf_config, source).to_dict()
    return ModelArchitecture.from_dict(dict(
        dense, num_experts=num_experts, moe_ffn_hidden_size=hf_config["moe_intermediate_size"],
        moe_router_topk=hf_config["num_experts_per_tok"],
        moe_router_pre_softmax=not hf_config.get("norm_topk_prob", False),
    ))


def hf_config_from_architecture(arch: ModelArchitecture) -> dict:
    return dict(qwen3.hf_config_from_architecture(arch), num_experts=arch.num_experts,
                moe_intermediate_size=arch.moe_ffn_hidden_size, num_experts_per_tok=arch.moe_router_topk,
                norm_topk_prob=not arch.moe_router_pre_softmax, decoder_sparse_step=1, mlp_only_layers=[])
