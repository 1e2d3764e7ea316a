"""Fill this rank's shards from full (unsharded) tensors, layout-independently.

Canonical names are megatron-core's local-spec parameter names with *global*
layer numbers (``decoder.layers.{i}.mlp.linear_fc1.weight``); TE-spec names are
mapped onto them by a pure key mapping. A full tensor is laid out as a TP=1
model would hold it:

- ``linear_qkv``: rows grouped per query group, ``[q heads of group g; k_g; v_g]``
  for g = 0..groups-1, so a contiguous TP chunk holds whole groups;
- ``linear_fc1`` (SwiGLU): ``[gate; up]``; TP rank r holds ``[gate_r; up_r]``;
- vocab rows unpadded; padded here to the TP-divisible size with zeros.

Random initialisation draws every full tensor from a generator seeded by the
run seed and the tensor's canonical name, so TP/PP/DP layouts start from
bit-identical weights (the layout-equivalence tests depend on it).
"""

import math
import re
import zlib
from typing import Callable, Iterator, List, Tuple

import torch

from megatron_dpo.models.architecture import ModelArchitecture
from megatron_dpo.models.build import layer_offset, unwrap
from megatron_dpo.parallel.dims import ParallelDims

# TE spec fuses the norms into the following linear layer.
_TE_TO_LOCAL = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
}
_VOCAB_PARAMS = ("embedding.word_embeddings.weight", "output_layer.weight")
# MoE experts: canonical names number experts globally, as a model with EP1
# holds them (``mlp.experts.local_experts.{e}.linear_fc1.weight``); a rank's
# local expert j is global expert (EP rank x local experts + j). TE's grouped
# GEMM keeps one weight per local expert in one module (``linear_fc1.weight{j}``).
_LOCAL_EXPERT = re.compile(r"\.mlp\.experts\.local_experts\.(\d+)\.")
_GROUPED_EXPERT = re.compile(r"\.mlp\.experts\.(linear_fc[12])\.weight(\d+)$")


def _global_expert(name: str, expert_offset: int) -> str:
    grouped = _GROUPED_EXPERT.search(name)
    if grouped:
        linear, index = grouped.groups()
        return (name[: grouped.start()] + f".mlp.experts.local_experts.{int(index) + expert_offset}."
                f"{linear}.weight")
    return _LOCAL_EXPERT.sub(lambda m: f".mlp.experts.local_experts.{int(m.group(1)) + expert_offset}.", name)


def is_expert_param(name: str) -> bool:
    return ".mlp.experts." in name


def canonical_name(local_name: str, offset: int, tie_word_embeddings: bool, expert_offset: int = 0) -> str:
    """Local parameter name of a chunk -> canonical global name (``expert_offset``:
    the global index of this rank's first expert)."""
    name = _global_expert(local_name, expert_offset) if is_expert_param(local_name) else local_name
    for te_suffix, local_suffix in _TE_TO_LOCAL.items():
        if name.endswith(te_suffix):
            name = name[: -len(te_suffix)] + local_suffix
    if name.startswith("decoder.layers."):
        _, _, index, rest = name.split(".", 3)
        name = f"decoder.layers.{int(index) + offset}.{rest}"
    if tie_word_embeddings and name == "output_layer.weight":
        # The last stage's copy of a tied embedding (PP > 1).
        name = "embedding.word_embeddings.weight"
    return name


def named_shards(chunks: List[torch.nn.Module], arch: ModelArchitecture) -> Iterator[Tuple[str, torch.nn.Parameter]]:
    """(canonical name, local parameter) over all of this rank's chunks."""
    for chunk in chunks:
        gpt = unwrap(chunk)
        offset = layer_offset(chunk)
        expert_offset = _expert_offset(gpt)
        for local_name, param in gpt.named_parameters():
            yield canonical_name(local_name, offset, arch.tie_word_embeddings, expert_offset), param


def _expert_offset(gpt: torch.nn.Module) -> int:
    """Global index of this rank's first expert (megatron's MoELayer.local_expert_indices); 0 if dense."""
    for module in gpt.modules():
        if hasattr(module, "local_expert_indices"):
            return module.local_expert_indices[0]
    return 0


def _pad_vocab(name: str, full: torch.Tensor, padded_vocab: int) -> torch.Tensor:
    if name not in _VOCAB_PARAMS or full.shape[0] == padded_vocab:
        return full
    padding = full.new_zeros((padded_vocab - full.shape[0],) + tuple(full.shape[1:]))
    return torch.cat([full, padding], dim=0)


def tp_shard(name: str, full: torch.Tensor, param: torch.Tensor, ctx: ParallelDims) -> torch.Tensor:
    """This TP rank's slice of a full tensor, as megatron-core lays it out
    (experts: over the expert-tensor-parallel group)."""
    tp_size, tp_rank = (ctx.etp_size, ctx.etp_rank) if is_expert_param(name) else (ctx.tp_size, ctx.tp_rank)
    if not getattr(param, "tensor_model_parallel", False) or tp_size == 1:
        return full
    dim = param.partition_dim
    if name.endswith("linear_fc1.weight") and ".mlp." in name:
        gate, up = full.chunk(2, dim=dim)
        return torch.cat([gate.chunk(tp_size, dim)[tp_rank], up.chunk(tp_size, dim)[tp_rank]], dim)
    return full.chunk(tp_size, dim=dim)[tp_rank]


@torch.no_grad()
def load_full_weights(
    chunks: List[torch.nn.Module],
    arch: ModelArchitecture,
    ctx: ParallelDims,
    full_tensor: Callable[[str], torch.Tensor],
) -> None:
    """Copy ``full_tensor(canonical_name)`` into every local shard (shape-checked)."""
    padded_vocab = arch.padded_vocab_size(ctx.tp_size)
    mismatches = []
    for name, param in named_shards(chunks, arch):
        full = _pad_vocab(name, full_tensor(name), padded_vocab)
        shard = tp_shard(name, full, param, ctx)
        if shard.shape != param.shape:
            mismatches.append(f"{name}: expected shard {tuple(param.shape)}, got {tuple(shard.shape)} from full {tuple(full.shape)}")
            continue
        param.copy_(shard.to(param.dtype))
    if mismatches:
        raise ValueError("Weight shapes do not match the model:\n  " + "\n  ".join(mismatches))


def full_shape(name: str, arch: ModelArchitecture) -> Tuple[int, ...]:
    """Shape of the canonical full tensor ``name`` for this architecture."""
    head_dim = arch.head_dim
    qkv_rows = (arch.num_attention_heads + 2 * arch.num_query_groups) * head_dim
    shapes = {
        "embedding.word_embeddings.weight": (arch.vocab_size, arch.hidden_size),
        "output_layer.weight": (arch.vocab_size, arch.hidden_size),
        "decoder.final_layernorm.weight": (arch.hidden_size,),
        "input_layernorm.weight": (arch.hidden_size,),
        "pre_mlp_layernorm.weight": (arch.hidden_size,),
        "self_attention.linear_qkv.weight": (qkv_rows, arch.hidden_size),
        "self_attention.linear_qkv.bias": (qkv_rows,),
        "self_attention.linear_proj.weight": (arch.hidden_size, arch.num_attention_heads * head_dim),
        "self_attention.q_layernorm.weight": (head_dim,),
        "self_attention.k_layernorm.weight": (head_dim,),
        "mlp.linear_fc1.weight": (2 * arch.ffn_hidden_size, arch.hidden_size),
        "mlp.linear_fc2.weight": (arch.hidden_size, arch.ffn_hidden_size),
        "mlp.router.weight": (arch.num_experts, arch.hidden_size),
        "mlp.experts.linear_fc1.weight": (2 * (arch.moe_ffn_hidden_size or 0), arch.hidden_size),
        "mlp.experts.linear_fc2.weight": (arch.hidden_size, arch.moe_ffn_hidden_size),
    }
    key = name.split(".", 3)[3] if name.startswith("decoder.layers.") else name
    return shapes[re.sub(r"local_experts\.\d+\.", "", key)]


def canonical_names(arch: ModelArchitecture) -> List[str]:
    """Every canonical tensor of the model, in order: embedding, layers, final norm, output."""
    per_layer = [
        "input_layernorm.weight", "self_attention.linear_qkv.weight", "self_attention.linear_proj.weight",
        "pre_mlp_layernorm.weight",
    ]
    if arch.is_moe:
        per_layer.append("mlp.router.weight")
        per_layer += [f"mlp.experts.local_experts.{e}.{linear}.weight"
                      for e in range(arch.num_experts) for linear in ("linear_fc1", "linear_fc2")]
    else:
        per_layer += ["mlp.linear_fc1.weight", "mlp.linear_fc2.weight"]
    if arch.add_qkv_bias:
        per_layer.append("self_attention.linear_qkv.bias")
    if arch.qk_layernorm:
        per_layer += ["self_attention.q_layernorm.weight", "self_attention.k_layernorm.weight"]
    names = ["embedding.word_embeddings.weight"]
    names += [f"decoder.layers.{i}.{rest}" for i in range(arch.num_layers) for rest in per_layer]
    names.append("decoder.final_layernorm.weight")
    if not arch.tie_word_embeddings:
        names.append("output_layer.weight")
    return names


def random_full_tensor(name: str, arch: ModelArchitecture, seed: int, std: float = 0.02) -> torch.Tensor:
    """Megatron's default init (normal(0, std), output projections scaled by
    1/sqrt(2 num_layers), norms 1, biases 0), drawn per tensor by name."""
    shape = full_shape(name, arch)
    if name.endswith("norm.weight"):
        return torch.ones(shape)
    if name.endswith(".bias"):
        return torch.zeros(shape)
    if name.endswith(("linear_proj.weight", "linear_fc2.weight")):
        std = std / math.sqrt(2.0 * arch.num_layers)
    generator = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)
    return torch.randn(shape, generator=generator) * std


def init_weights(chunks: List[torch.nn.Module], arch: ModelArchitecture, ctx: ParallelDims, seed: int) -> None:
    load_full_weights(chunks, arch, ctx, lambda name: random_full_tensor(name, arch, seed))
