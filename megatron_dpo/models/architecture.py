"""Model architecture description shared by presets, HF loading and build.

One frozen dataclass holds every number that decides tensor shapes, so the
config validator, the builder and the converters agree on them.
"""

from dataclasses import asdict, dataclass
from typing import Optional

from megatron_dpo.config.errors import ConfigError


@dataclass(frozen=True)
class ModelArchitecture:
    """A Llama-family decoder: RMSNorm, SwiGLU MLP, RoPE, GQA."""

    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    vocab_size: int
    max_position_embeddings: int = 4096
    rotary_base: float = 10000.0
    norm_epsilon: float = 1e-5
    tie_word_embeddings: bool = False
    # Per-head dimension when it is not hidden_size / num_attention_heads.
    kv_channels: Optional[int] = None
    add_qkv_bias: bool = False
    qk_layernorm: bool = False
    # Llama 3.x "llama3" RoPE frequency scaling factor; None means no scaling.
    rope_scaling_factor: Optional[float] = None
    # Sliding-window attention span (Mistral, Qwen2); None: full attention.
    # The model is built with full causal attention, which equals the window
    # only for sequences no longer than it (check_sequence_length).
    sliding_window: Optional[int] = None
    # Mixture of Experts (Mixtral, Qwen3-MoE): every layer's MLP is num_experts
    # SwiGLU experts of moe_ffn_hidden_size, moe_router_topk of them per token.
    # None: a dense MLP of ffn_hidden_size. moe_router_pre_softmax: softmax over
    # all experts, then top-k without renormalising (Qwen3's norm_topk_prob=false);
    # otherwise softmax over the top-k logits (Mixtral; norm_topk_prob=true).
    num_experts: Optional[int] = None
    moe_ffn_hidden_size: Optional[int] = None
    moe_router_topk: int = 2
    moe_router_pre_softmax: bool = False
    # The Hugging Face class it converts to and from (models/conversion/registry.py).
    hf_architecture: str = "LlamaForCausalLM"

    @property
    def is_moe(self) -> bool:
        return self.num_experts is not None

    @property
    def head_dim(self) -> int:
        return self.kv_channels or self.hidden_size // self.num_attention_heads

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "ModelArchitecture":
        return cls(**values)

    def padded_vocab_size(self, tp_size: int) -> int:
        """Vocab rounded up so each TP rank holds an equal slice (VocabParallelEmbedding)."""
        return -(-self.vocab_size // tp_size) * tp_size


def check_sequence_length(arch: ModelArchitecture, max_length: int) -> None:
    """Full causal attention equals a sliding window only within the window."""
    if arch.sliding_window is not None and max_length > arch.sliding_window:
        raise ConfigError(
            f"policy.max_total_sequence_length({max_length}) exceeds the model's sliding_window"
            f"({arch.sliding_window}); megatron_dpo uses full attention, which matches sliding-window "
            f"attention only up to the window. Set policy.max_total_sequence_length <= {arch.sliding_window}."
        )
