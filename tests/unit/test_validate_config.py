"""``python -m megatron_dpo.cli validate-config``: shipped configs pass at their
intended world size, impossible layouts fail naming the key and the fix, and
the memory estimate counts parameters like the published checkpoints."""

import os

import pytest

from megatron_dpo.cli import main
from megatron_dpo.config import load_config
from megatron_dpo.models.conversion import registry
from megatron_dpo.models.known import HF_CONFIGS
from megatron_dpo.models.memory import active_parameters, estimate_memory, stage_parameters
from megatron_dpo.parallel.dims import ParallelDims
from tests.conftest import REPO

CONFIGS = os.path.join(REPO, "configs")
# Every shipped config and the world size its header says it is written for.
INTENDED_WORLD_SIZE = {
    "dpo.yaml": 1,
    "llama3.2-1b.yaml": 8,
    "llama3.1-8b-tp4.yaml": 32,
    "llama3.1-70b-tp8pp4.yaml": 32,
    "qwen3_30b_a3b.yaml": 16,
    "mixtral_8x7b.yaml": 32,
}


def _validate(name: str, world_size: int, *overrides: str) -> int:
    return main(["validate-config", "--config", os.path.join(CONFIGS, name), "--world-size", str(world_size),
                 *overrides])


def _architecture(hub_id: str):
    return registry.architecture_from_hf_config(HF_CONFIGS[hub_id], hub_id)


def test_every_shipped_config_is_checked():
    assert sorted(n for n in os.listdir(CONFIGS) if n.endswith(".yaml")) == sorted(INTENDED_WORLD_SIZE)


@pytest.mark.parametrize("name", sorted(INTENDED_WORLD_SIZE))
def test_shipped_config_is_valid_at_its_world_size(name, capsys):
    world_size = INTENDED_WORLD_SIZE[name]
    assert _validate(name, world_size) == 0
    out = capsys.readouterr().out
    assert f"is valid for world size {world_size}" in out
    assert "optimizer" in out and "activations" in out and "total" in out


@pytest.mark.parametrize("world_size, overrides, problem, fix", [
    (48, [], "= 32 does not divide WORLD_SIZE(48)", "Use a world size that is a multiple of 32"),
    (64, ["policy.megatron_cfg.tensor_model_parallel_size=16"],
     "num_query_groups(8) is not divisible by tensor_model_parallel_size(16)",
     "Set policy.megatron_cfg.tensor_model_parallel_size to one of 1, 2, 4, 8"),
    (96, ["policy.megatron_cfg.pipeline_model_parallel_size=3"],
     "num_layers(80) is not divisible by pipeline_model_parallel_size(3)",
     "Set policy.megatron_cfg.pipeline_model_parallel_size to one of 1, 2, 4, 5, 8"),
    (96, [], "policy.train_global_batch_size(128) is not divisible by",
     "Set policy.train_global_batch_size to a multiple of 3 (nearest: 126 or 129)"),
    (8, ["policy.megatron_cfg.pipeline_model_parallel_size=1", "policy.megatron_cfg.activation_checkpointing=false"],
     "exceeds --gpu-memory-gib 80", "set policy.megatron_cfg.activation_checkpointing=true"),
    (32, ["policy.model_name=meta-llama/Llama-3.1-70b"], "is neither a built-in preset",
     "validate-config also knows these hub ids (no weights needed): meta-llama/Llama-3.2-1B"),
])
def test_impossible_config_fails_naming_the_fix(world_size, overrides, problem, fix, capsys):
    assert _validate("llama3.1-70b-tp8pp4.yaml", world_size, *overrides) == 2
    err = capsys.readouterr().err
    assert problem in err and fix in err


@pytest.mark.parametrize("hub_id, num_parameters", [
    ("meta-llama/Llama-3.2-1B", 1_235_814_400),  # tied embedding
    ("meta-llama/Llama-3.1-8B", 8_030_261_248),
    ("meta-llama/Llama-3.1-70B-Instruct", 70_553_706_496),
])
def test_parameter_count_matches_the_published_checkpoint(hub_id, num_parameters):
    assert sum(stage_parameters(_architecture(hub_id), 1, 1)) == num_parameters


def test_parameters_shard_over_tp_and_split_over_pp():
    arch = _architecture("meta-llama/Llama-3.1-8B")
    total = sum(stage_parameters(arch, 1, 1))
    norms = (2 * arch.num_layers + 1) * arch.hidden_size  # RMSNorm weights stay whole on every TP rank
    assert sum(stage_parameters(arch, 4, 1)) * 4 == total + 3 * norms
    first, *_, last = stage_parameters(arch, 1, 4)
    assert sum(stage_parameters(arch, 1, 4)) == total and first < last  # the output layer outweighs the norm
    tied = _architecture("meta-llama/Llama-3.2-1B")
    # With PP the last stage holds its own copy of a tied embedding.
    assert sum(stage_parameters(tied, 1, 2)) == sum(stage_parameters(tied, 1, 1)) + tied.vocab_size * tied.hidden_size


def test_distributed_optimizer_shards_adam_state_over_dp():
    path = os.path.join(CONFIGS, "llama3.1-8b-tp4.yaml")
    arch = _architecture("meta-llama/Llama-3.1-8B")

    def optimizer_bytes(distributed: bool) -> float:
        cfg = load_config(path, [f"policy.megatron_cfg.optimizer.use_distributed_optimizer={distributed}"])
        layout = ParallelDims.resolve(cfg.policy, 32, arch.num_layers, arch.num_attention_heads, arch.num_query_groups)
        (size,) = [size for what, size in estimate_memory(arch, cfg, layout).rows if what.startswith("optimizer")]
        return size

    assert optimizer_bytes(True) * 8 == pytest.approx(optimizer_bytes(False))


def test_interleaved_pipeline_holds_megatrons_warmup_count_in_flight():
    from megatron_dpo.models.memory import layers_in_flight

    def layout(pp, vpp, microbatches):
        return ParallelDims(world_size=pp, tp_size=1, pp_size=pp, dp_size=1, vpp_size=vpp,
                            num_microbatches=microbatches)

    # 1F1B: stage 0 of PP4 holds 4 micro-batches of its 8 layers.
    assert layers_in_flight(32, layout(4, None, 16), 0) == 4 * 8
    # Interleaved PP4 x VPP2: 2(4-0-1) + (2-1)4 + 1 = 11 chunk-micro-batches of 4 layers on stage 0.
    assert layers_in_flight(32, layout(4, 2, 16), 0) == 11 * 4
    assert layers_in_flight(32, layout(4, 2, 16), 3) == 5 * 4
    # Capped at micro-batches x chunks.
    assert layers_in_flight(32, layout(4, 2, 4), 0) == 8 * 4


def test_unfused_kernels_and_runtime_add_memory():
    path = os.path.join(CONFIGS, "llama3.1-8b-tp4.yaml")
    arch = _architecture("meta-llama/Llama-3.1-8B")

    def rows(*overrides):
        cfg = load_config(path, list(overrides))
        layout = ParallelDims.resolve(cfg.policy, 8, arch.num_layers, arch.num_attention_heads, arch.num_query_groups)
        return dict(estimate_memory(arch, cfg, layout).rows)

    fused = rows()
    unfused = rows("policy.megatron_cfg.bias_activation_fusion=false", "policy.megatron_cfg.apply_rope_fusion=false")
    assert unfused["activations (rough)"] > fused["activations (rough)"]
    runtime = "CUDA context, workspaces, NCCL buffers (+ unfused wgrad)"
    assert fused[runtime] == pytest.approx(0.75 * 2**30 + 2 * 0.25 * 2**30)  # TP4 and DP2 communicators


@pytest.mark.parametrize("hub_id, total, active, published_total, published_active", [
    # Worked out from config.json: per layer attention (q, k, v, o) + 2 norms (+ q/k norms) + router
    # + experts x 3 x moe_ffn x hidden; plus embedding, output layer and final norm.
    # Qwen3-30B-A3B: 48 x (18,874,368 + 4,096 + 256 + 262,144 + 128 x 4,718,592) + 2 x 311,164,928 + 2,048;
    # active: 8 of 128 experts. Published: 30.5B, 3.3B (Qwen's card truncates 3.35).
    ("Qwen/Qwen3-30B-A3B", 30_532_122_624, 3_353_032_704, 30.5, 3.3),
    # Mixtral-8x7B: 32 x (41,943,040 + 8,192 + 32,768 + 8 x 176,160,768) + 2 x 131,072,000 + 4,096;
    # active: 2 of 8 experts. Published: 46.7B, 12.9B.
    ("mistralai/Mixtral-8x7B-v0.1", 46_702_792_704, 12_879_925_248, 46.7, 12.9),
])
def test_moe_parameter_counts_equal_the_published_ones(hub_id, total, active, published_total, published_active):
    arch = _architecture(hub_id)
    assert sum(stage_parameters(arch, 1, 1)) == total and active_parameters(arch) == active
    assert abs(total / 1e9 - published_total) < 0.06 and abs(active / 1e9 - published_active) < 0.06
    # With EP the experts, not the dense weights, are split: one GPU of EP8 holds 1/8 of them.
    experts = sum(stage_parameters(arch, 1, 1, experts_only=True))
    assert sum(stage_parameters(arch, 1, 1, ep_size=8)) == total - experts + experts // 8


def test_moe_config_reports_active_parameters_and_the_expert_layout(capsys):
    assert _validate("qwen3_30b_a3b.yaml", 16) == 0
    out = capsys.readouterr().out
    assert "30.53B parameters" in out and "3.35B active parameters per token" in out
    assert "expert-TP 1 x EP 8 x PP 1 x expert-DP 2; 16 expert(s) per GPU" in out
    assert _validate("qwen3_30b_a3b.yaml", 16, "policy.megatron_cfg.expert_model_parallel_size=3") == 2
    assert "num_experts(128) is not divisible by expert_model_parallel_size(3)" in capsys.readouterr().err
