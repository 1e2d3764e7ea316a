"""LoRA config, naming and memory planning (no process group): errors name
the key; HF and megatron target names mean the same modules; PEFT key names;
validate-config's LoRA estimate (8B on one 80 GB GPU, 70B on 8)."""

import os

import pytest
import torch

from megatron_dpo.cli import main
from megatron_dpo.config import load_config
from megatron_dpo.config.errors import ConfigError
from megatron_dpo.config.schema import LoraConfig, lora_hf_targets
from megatron_dpo.models import presets
from megatron_dpo.models.conversion import llama
from megatron_dpo.models.lora import merged_delta, peft_key
from megatron_dpo.models.memory import lora_stage_parameters
from tests.conftest import REPO

CONFIG = os.path.join(REPO, "configs", "dpo.yaml")
LORA = ["policy.lora_cfg.enabled=true", "policy.lora_cfg.dim=16", "policy.lora_cfg.alpha=32",
        "policy.lora_cfg.target_modules=[linear_qkv,linear_proj,linear_fc1,linear_fc2]"]
BIG = ["policy.precision=bfloat16", "policy.max_total_sequence_length=2048", "policy.train_micro_batch_size=1",
       "policy.train_global_batch_size=64", "policy.megatron_cfg.activation_checkpointing=true",
       "data.val_data_path=null"]


@pytest.mark.parametrize("overrides, key", [
    (["policy.lora_cfg.enabled=true", "policy.lora_cfg.target_modules=[qproj]"], "policy.lora_cfg.target_modules"),
    (["policy.lora_cfg.enabled=true", "policy.lora_cfg.dim=0"], "policy.lora_cfg.dim"),
    (["policy.lora_cfg.enabled=true", "policy.lora_cfg.dropout=1.0"], "policy.lora_cfg.dropout"),
    (["policy.lora_cfg.init_adapter_path=/tmp/x"], "policy.lora_cfg.init_adapter_path"),
    (["checkpointing.export_adapter_dir=/tmp/x"], "checkpointing.export_adapter_dir"),
    (["policy.lora_cfg.enabled=true", "policy.megatron_cfg.sequence_parallel=true",
      "policy.megatron_cfg.tensor_model_parallel_size=2"], "sequence_parallel"),
])
def test_config_errors_name_the_key(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(CONFIG, overrides)


def test_megatron_names_stand_for_their_hf_parts():
    assert lora_hf_targets(["linear_qkv", "linear_fc1"]) == ["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"]
    assert lora_hf_targets(["down_proj", "o_proj", "linear_proj"]) == ["o_proj", "down_proj"]


def test_peft_key_names():
    assert peft_key("decoder.layers.3.self_attention.linear_qkv.lora.k_proj.A") == (
        "base_model.model.model.layers.3.self_attn.k_proj.lora_A.weight")
    assert peft_key("decoder.layers.0.mlp.linear_fc2.lora.down_proj.B") == (
        "base_model.model.model.layers.0.mlp.down_proj.lora_B.weight")


def test_merged_delta_lands_in_the_fused_rows_of_each_part():
    """scaling * B @ A of q, k, v and gate, up, fused as the base weights are (llama.fuse)."""
    arch = presets.preset_architecture("tiny-llama", 768)
    generator = torch.Generator().manual_seed(0)
    pairs = {}
    for part, fan_out, fan_in in (("q_proj", 64, 64), ("v_proj", 32, 64)):
        pairs[part] = (torch.randn(2, fan_in, generator=generator), torch.randn(fan_out, 2, generator=generator))
    delta = merged_delta("self_attention.linear_qkv", pairs, 0.5, arch)
    q, k, v = llama.split("decoder.layers.0.self_attention.linear_qkv.weight", delta, arch)
    torch.testing.assert_close(q, 0.5 * pairs["q_proj"][1] @ pairs["q_proj"][0])
    assert not k.any()
    torch.testing.assert_close(v, 0.5 * pairs["v_proj"][1] @ pairs["v_proj"][0])


def test_adapter_parameters_per_gpu():
    """Rank r: column layers hold r x in + out/TP x r, row layers r x in/TP + out x r."""
    arch = presets.preset_architecture("tiny-llama", 768)  # hidden 64, ffn 176, 4 heads, 2 groups of 16
    cfg = LoraConfig(enabled=True, dim=4, target_modules=["linear_qkv", "linear_fc2"])
    per_layer_tp1 = 4 * (64 + 64) + 2 * 4 * (64 + 32) + 4 * (176 + 64)
    assert lora_stage_parameters(arch, cfg, 1, 1) == [4 * per_layer_tp1]
    per_layer_tp2 = 3 * 4 * 64 + 4 * (64 + 2 * 32) // 2 + 4 * 176 // 2 + 64 * 4
    assert lora_stage_parameters(arch, cfg, 2, 2) == [2 * per_layer_tp2] * 2


def test_lora_8b_fits_one_80gb_gpu_and_70b_eight(capsys):
    base = ["validate-config", "--config", CONFIG, "--gpu-memory-gib", "80"]
    assert main([*base, "--world-size", "1", "policy.model_name=meta-llama/Llama-3.1-8B", *BIG, *LORA]) == 0
    out = capsys.readouterr().out
    assert "reference weights (LoRA" in out and "adapter grads (fp32)" in out
    assert main([*base, "--world-size", "1", "policy.model_name=meta-llama/Llama-3.1-8B", *BIG]) == 2  # full DPO
    assert main([*base, "--world-size", "8", "policy.model_name=meta-llama/Llama-3.1-70B", *BIG, *LORA,
                 "policy.megatron_cfg.tensor_model_parallel_size=8"]) == 0
    assert main([*base, "--world-size", "8", "policy.model_name=meta-llama/Llama-3.1-70B", *BIG,
                 "policy.megatron_cfg.tensor_model_parallel_size=8"]) == 2
