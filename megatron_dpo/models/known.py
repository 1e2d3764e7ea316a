"""Architectures of public checkpoints, by Hugging Face hub id.

``validate-config`` checks a config against its model's shapes without the
weights: ``policy.model_name`` may be a hub id listed here (as the shipped
``configs/llama3*.yaml`` are) instead of a local directory. The values are the
checkpoints' own ``config.json`` fields and go through the same mapping as a
local ``config.json`` (checkpoint.source.resolve_architecture). Training reads
local directories only: download the checkpoint and set ``policy.model_name``
to it.
"""

_LLAMA3_ROPE = {"rope_type": "llama3", "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}
_LLAMA3 = {
    "architectures": ["LlamaForCausalLM"], "hidden_act": "silu", "vocab_size": 128256,
    "max_position_embeddings": 131072, "rope_theta": 500000.0, "rms_norm_eps": 1e-5,
}
_BASE_CONFIGS = {
    "meta-llama/Llama-3.2-1B": dict(
        _LLAMA3, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
        num_key_value_heads=8, head_dim=64, tie_word_embeddings=True, rope_scaling=dict(_LLAMA3_ROPE, factor=32.0),
    ),
    "meta-llama/Llama-3.1-8B": dict(
        _LLAMA3, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, tie_word_embeddings=False, rope_scaling=dict(_LLAMA3_ROPE, factor=8.0),
    ),
    "meta-llama/Llama-3.1-70B": dict(
        _LLAMA3, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
        num_key_value_heads=8, tie_word_embeddings=False, rope_scaling=dict(_LLAMA3_ROPE, factor=8.0),
    ),
}
# Mixture of Experts (config.json of the hub releases; the instruction-tuned
# releases share them).
_QWEN3_30B_A3B = dict(
    architectures=["Qwen3MoeForCausalLM"], hidden_act="silu", vocab_size=151936, hidden_size=2048,
    intermediate_size=6144, moe_intermediate_size=768, num_hidden_layers=48, num_attention_heads=32,
    num_key_value_heads=4, head_dim=128, num_experts=128, num_experts_per_tok=8, norm_topk_prob=True,
    decoder_sparse_step=1, mlp_only_layers=[], max_position_embeddings=40960, rope_theta=1000000.0,
    rope_scaling=None, rms_norm_eps=1e-6, tie_word_embeddings=False, use_sliding_window=False,
)
_MIXTRAL_8X7B = dict(
    architectures=["MixtralForCausalLM"], hidden_act="silu", vocab_size=32000, hidden_size=4096,
    intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
    num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=32768, rope_theta=1000000.0,
    rms_norm_eps=1e-5, tie_word_embeddings=False, sliding_window=None, router_jitter_noise=0.0,
)
_MOE_CONFIGS = {
    "Qwen/Qwen3-30B-A3B": _QWEN3_30B_A3B,
    "Qwen/Qwen3-30B-A3B-Instruct-2507": _QWEN3_30B_A3B,
    "mistralai/Mixtral-8x7B-v0.1": _MIXTRAL_8X7B,
    "mistralai/Mixtral-8x7B-Instruct-v0.1": _MIXTRAL_8X7B,
}
# The instruction-tuned releases share their base model's architecture.
HF_CONFIGS = {**_BASE_CONFIGS, **{f"{name}-Instruct": config for name, config in _BASE_CONFIGS.items()},
              **_MOE_CONFIGS}
