"""Pure parts of layout-independent weight loading: canonical names (incl. the
TE spec's fused-norm keys), TP slicing of fused tensors, seeded init."""

import torch

from megatron_dpo.models.architecture import ModelArchitecture
from megatron_dpo.models.weights import canonical_name, random_full_tensor, tp_shard
from megatron_dpo.parallel.dims import ParallelDims

ARCH = ModelArchitecture(num_layers=2, hidden_size=8, ffn_hidden_size=6, num_attention_heads=4,
                         num_query_groups=2, vocab_size=11)


def context(tp_rank: int, tp_size: int = 2) -> ParallelDims:
    return ParallelDims.of_sizes(tp_size, tp_size=tp_size).with_ranks(rank=tp_rank, tp_rank=tp_rank)


def tp_param(shape, partition_dim: int) -> torch.Tensor:
    param = torch.empty(shape)
    param.tensor_model_parallel, param.partition_dim = True, partition_dim
    return param


def test_local_and_te_names_map_to_global_canonical_names():
    assert canonical_name("decoder.layers.1.mlp.linear_fc1.weight", 2, False) == "decoder.layers.3.mlp.linear_fc1.weight"
    assert canonical_name("decoder.layers.0.self_attention.linear_qkv.layer_norm_weight", 1, False) == \
        "decoder.layers.1.input_layernorm.weight"
    assert canonical_name("decoder.layers.0.mlp.linear_fc1.layer_norm_weight", 0, False) == \
        "decoder.layers.0.pre_mlp_layernorm.weight"
    assert canonical_name("output_layer.weight", 0, True) == "embedding.word_embeddings.weight"
    assert canonical_name("output_layer.weight", 0, False) == "output_layer.weight"


def test_swiglu_fc1_shards_are_gate_slice_then_up_slice():
    gate = torch.arange(12.0).reshape(6, 2)
    up = 100 + torch.arange(12.0).reshape(6, 2)
    full = torch.cat([gate, up])  # [gate; up], as a TP=1 model holds it
    param = tp_param((6, 2), partition_dim=0)
    rank1 = tp_shard("decoder.layers.0.mlp.linear_fc1.weight", full, param, context(1))
    torch.testing.assert_close(rank1, torch.cat([gate[3:], up[3:]]))


def test_row_parallel_shards_split_the_input_dim_and_replicated_params_are_whole():
    full = torch.arange(24.0).reshape(4, 6)
    rank0 = tp_shard("decoder.layers.0.mlp.linear_fc2.weight", full, tp_param((4, 3), 1), context(0))
    torch.testing.assert_close(rank0, full[:, :3])
    norm = torch.ones(4)
    assert tp_shard("decoder.final_layernorm.weight", norm, torch.empty(4), context(1)) is norm


def test_random_init_is_seeded_per_name_and_follows_megatron_defaults():
    name = "decoder.layers.0.self_attention.linear_qkv.weight"
    first, again = random_full_tensor(name, ARCH, seed=7), random_full_tensor(name, ARCH, seed=7)
    torch.testing.assert_close(first, again)
    assert first.shape == ((4 + 2 * 2) * 2, 8)  # (heads + 2 groups) x head_dim rows
    assert not torch.equal(first, random_full_tensor(name, ARCH, seed=8))
    assert not torch.equal(random_full_tensor("decoder.layers.1.self_attention.linear_qkv.weight", ARCH, seed=7), first)
    assert torch.equal(random_full_tensor("decoder.final_layernorm.weight", ARCH, seed=7), torch.ones(8))
    proj = random_full_tensor("decoder.layers.0.mlp.linear_fc2.weight", ARCH, seed=7)
    assert proj.std() < first.std()  # output projections scaled by 1/sqrt(2 num_layers)


def test_conversion_builds_on_the_cpu_whatever_the_node_has():
    from megatron_dpo.parallel.init import device_type

    assert device_type(cuda_available=True) == "cuda"
    assert device_type(cuda_available=True, for_conversion=True) == "cpu"
    assert device_type(cuda_available=False) == device_type(cuda_available=False, for_conversion=True) == "cpu"


def test_expert_names_are_global_and_experts_shard_over_expert_tp():
    # EP rank 1 of 2 with 2 local experts holds global experts 2 and 3.
    assert canonical_name("decoder.layers.1.mlp.experts.local_experts.1.linear_fc2.weight", 2, False, 2) == \
        "decoder.layers.3.mlp.experts.local_experts.3.linear_fc2.weight"
    assert canonical_name("decoder.layers.0.mlp.experts.linear_fc1.weight1", 0, False, 2) == \
        "decoder.layers.0.mlp.experts.local_experts.3.linear_fc1.weight"  # TE grouped GEMM
    full = torch.arange(24.0).reshape(4, 6)
    name = "decoder.layers.0.mlp.experts.local_experts.0.linear_fc2.weight"
    tp2_ep1 = context(1)  # TP2 with expert-TP 1: experts stay whole
    assert tp_shard(name, full, tp_param((4, 6), 1), tp2_ep1) is full
    etp2 = ParallelDims.of_sizes(2, tp_size=2, etp_size=2).with_ranks(rank=1, tp_rank=1, etp_rank=1)
    torch.testing.assert_close(tp_shard(name, full, tp_param((4, 3), 1), etp2), full[:, 3:])
