"""Pure parts of HF <-> megatron conversion: tensor name mapping and QKV / fc1
(un)fusing, config translation per family and its refusals, HF file errors,
export planning and checks."""

import json
import re

import pytest
import torch

from megatron_dpo.checkpoint.hf_export import (
    EXPORT_MARKER, _check_slots, plan_shards, _Slot, check_export_dir, read_architecture,
)
from megatron_dpo.config import ConfigError, load_config
from megatron_dpo.convert_cli import parse_size
from megatron_dpo.models import presets
from megatron_dpo.models.architecture import ModelArchitecture
from megatron_dpo.models.conversion import ConversionError, hf_io, llama, registry
from megatron_dpo.models.architecture import check_sequence_length
from megatron_dpo.models.weights import canonical_names, full_shape

GQA = ModelArchitecture(num_layers=2, hidden_size=8, ffn_hidden_size=6, num_attention_heads=4,
                        num_query_groups=2, vocab_size=11, add_qkv_bias=True, qk_layernorm=True)
TINY = dict(vocab_size=11, hidden_size=8, intermediate_size=6, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2)
CONFIGS = {
    "llama": dict(TINY, rope_theta=500000.0, rope_scaling={
        "rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192}, max_position_embeddings=131072, tie_word_embeddings=True),
    "mistral": dict(TINY, sliding_window=4096),
    "qwen2": dict(TINY, tie_word_embeddings=True),
    "qwen3": dict(TINY, head_dim=4),
}


HF_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                    "qwen3": "Qwen3ForCausalLM"}


def hf_config(model_type: str, **config) -> dict:
    """config.json as transformers writes it for these values."""
    from transformers import AutoConfig

    return dict(AutoConfig.for_model(model_type, **config).to_dict(), architectures=[HF_ARCHITECTURES[model_type]])


def test_qkv_is_fused_per_query_group_and_split_back():
    d = GQA.head_dim
    q, k, v = (torch.arange(n * d, dtype=torch.float).reshape(n * d, 1) + offset
               for n, offset in ((4, 0), (2, 100), (2, 200)))
    fused = llama.fuse("decoder.layers.0.self_attention.linear_qkv.weight", [q, k, v], GQA)
    # group 0 = [q heads 0, 1; k head 0; v head 0], then group 1
    expected = torch.cat([q[: 2 * d], k[:d], v[:d], q[2 * d:], k[d:], v[d:]])
    assert torch.equal(fused, expected)
    parts = llama.split("decoder.layers.0.self_attention.linear_qkv.weight", fused, GQA)
    assert all(torch.equal(a, b) for a, b in zip(parts, (q, k, v)))
    bias = llama.split("decoder.layers.0.self_attention.linear_qkv.bias", fused[:, 0], GQA)
    assert [tuple(t.shape) for t in bias] == [(4 * d,), (2 * d,), (2 * d,)]


def test_fc1_is_gate_then_up_and_split_parts_own_their_storage():
    gate, up = torch.randn(6, 8), torch.randn(6, 8)
    fc1 = llama.fuse("decoder.layers.1.mlp.linear_fc1.weight", [gate, up], GQA)
    assert torch.equal(fc1, torch.cat([gate, up]))
    parts = llama.split("decoder.layers.1.mlp.linear_fc1.weight", fc1, GQA)
    assert torch.equal(parts[0], gate) and torch.equal(parts[1], up)
    assert parts[0].untyped_storage().data_ptr() != parts[1].untyped_storage().data_ptr()


@pytest.mark.parametrize("model_type", CONFIGS)
def test_hf_names_are_exactly_the_transformers_state_dict(model_type):
    import transformers

    config = transformers.AutoConfig.for_model(model_type, **CONFIGS[model_type])
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    arch = registry.architecture_from_hf_config(hf_config(model_type, **CONFIGS[model_type]), "config.json")
    hf_keys = set(model.state_dict()) - ({"lm_head.weight"} if arch.tie_word_embeddings else set())
    assert sorted(llama.expected_hf_names(canonical_names(arch))) == sorted(hf_keys)
    for name in canonical_names(arch):
        shapes = [tuple(model.state_dict()[hf].shape) for hf in llama.hf_names(name)]
        fused = llama.fuse(name, [torch.zeros(shape) for shape in shapes], arch)
        assert tuple(fused.shape) == full_shape(name, arch)


@pytest.mark.parametrize("model_type", CONFIGS)
def test_config_translation_round_trips(model_type):
    arch = registry.architecture_from_hf_config(hf_config(model_type, **CONFIGS[model_type]), "config.json")
    fields = registry.hf_config_from_architecture(arch)
    assert registry.architecture_from_hf_config(hf_config(fields.pop("model_type"), **fields), "x") == arch


def test_family_specific_architecture_fields():
    def arch(model_type):
        return registry.architecture_from_hf_config(hf_config(model_type, **CONFIGS[model_type]), "config.json")

    assert arch("llama").rope_scaling_factor == 32.0 and arch("llama").rotary_base == 500000.0
    assert arch("mistral").sliding_window == 4096
    assert arch("qwen2").add_qkv_bias and arch("qwen2").tie_word_embeddings
    assert arch("qwen3").qk_layernorm and arch("qwen3").head_dim == 4


def test_transformers_4_config_keys_are_read():
    config = dict(TINY, architectures=["LlamaForCausalLM"], rope_theta=1e6,
                  rope_scaling={"type": "llama3", "factor": 8.0})
    arch = registry.architecture_from_hf_config(config, "config.json")
    assert arch.rotary_base == 1e6 and arch.rope_scaling_factor == 8.0


@pytest.mark.parametrize("change, message", [
    (dict(architectures=["GPT2LMHeadModel"]), "unsupported architecture 'GPT2LMHeadModel'; supported: LlamaForCausalLM"),
    (dict(architectures=[]), "'architectures' must name one model class"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "rope type='yarn'"),
    (dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 2.0}), "low_freq_factor=2.0"),
    (dict(attention_bias=True), "attention_bias=True"),
    (dict(hidden_act="gelu"), "hidden_act='gelu'"),
    (dict(hidden_size=None), "hidden_size"),
])
def test_unsupported_llama_configs_are_refused_by_name(change, message):
    config = {key: value for key, value in {**TINY, "architectures": ["LlamaForCausalLM"], **change}.items()
              if value is not None}
    with pytest.raises(ConversionError, match="config.json: .*" + re.escape(message)):
        registry.architecture_from_hf_config(config, "config.json")


def test_qwen_sliding_window_and_mistral_llama3_rope_are_refused():
    with pytest.raises(ConversionError, match="use_sliding_window=True"):
        registry.architecture_from_hf_config(dict(TINY, architectures=["Qwen2ForCausalLM"], use_sliding_window=True), "c")
    with pytest.raises(ConversionError, match="rope type='llama3'"):
        registry.architecture_from_hf_config(
            dict(TINY, architectures=["MistralForCausalLM"], rope_scaling={"rope_type": "llama3", "factor": 8.0}), "c")


def test_sequences_longer_than_the_sliding_window_are_refused():
    arch = ModelArchitecture(**{**GQA.to_dict(), "sliding_window": 4096})
    check_sequence_length(arch, 4096)
    with pytest.raises(ConfigError, match=r"max_total_sequence_length\(8192\) exceeds the model's sliding_window\(4096\)"):
        check_sequence_length(arch, 8192)


def test_hf_directory_errors_name_the_file_and_fix(tmp_path):
    with pytest.raises(ConversionError, match="has no config.json"):
        hf_io.read_config(str(tmp_path))
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConversionError, match="config.json is not valid JSON"):
        hf_io.read_config(str(tmp_path))
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ConversionError, match="PyTorch .bin weights: re-save it with save_pretrained"):
        hf_io.HFCheckpoint(str(tmp_path))
    (tmp_path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{trunc")
    with pytest.raises(ConversionError, match="model.safetensors .*corrupt or truncated"):
        hf_io.HFCheckpoint(str(tmp_path))
    (tmp_path / hf_io.INDEX_FILE).write_text(json.dumps({"weight_map": {"a": "model-00001-of-00002.safetensors"}}))
    with pytest.raises(ConversionError, match="lists missing files: .*model-00001-of-00002.safetensors"):
        hf_io.HFCheckpoint(str(tmp_path))


def test_tensor_set_mismatch_lists_missing_and_unexpected_keys(tmp_path):
    from safetensors.torch import save_file

    save_file({"model.embed_tokens.weight": torch.zeros(2, 2), "model.layers.0.self_attn.o_proj.bias": torch.zeros(2),
               "lm_head.weight": torch.zeros(2, 2)}, str(tmp_path / "model.safetensors"))
    checkpoint = hf_io.HFCheckpoint(str(tmp_path))
    checkpoint.check_keys(["model.embed_tokens.weight", "model.layers.0.self_attn.o_proj.bias"], tie_word_embeddings=True)
    with pytest.raises(ConversionError, match=r"missing tensors \[model.norm.weight\]; unexpected tensors "
                                              r"\[model.layers.0.self_attn.o_proj.bias\]"):
        checkpoint.check_keys(["model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"], False)
    with pytest.raises(ConversionError, match="has no tensor 'nope'"):
        checkpoint.tensor("nope")


def test_export_plan_keeps_tensor_order_and_the_size_limit():
    sizes = {"a": 4, "b": 4, "c": 9, "d": 1}
    assert plan_shards(list(sizes), sizes, 8) == [["a", "b"], ["c"], ["d"]]
    assert plan_shards(list(sizes), sizes, 100) == [["a", "b", "c", "d"]]
    assert hf_io.shard_file_name(0, 3) == "model-00001-of-00003.safetensors"
    assert hf_io.shard_file_name(0, 1) == "model.safetensors"


def test_checkpoint_not_matching_its_architecture_is_refused():
    slots = {name: _Slot("k", None, full_shape(name, GQA), torch.float32) for name in canonical_names(GQA)}
    slots["embedding.word_embeddings.weight"] = _Slot("k", None, (12, 8), torch.float32)  # TP2 padding: fine
    _check_slots(slots, GQA, "policy")
    del slots["decoder.final_layernorm.weight"]
    slots["decoder.layers.2.mlp.linear_fc2.weight"] = slots["decoder.layers.1.mlp.linear_fc2.weight"]
    slots["decoder.layers.0.mlp.linear_fc1.weight"] = _Slot("k", (0, 2), (6, 8), torch.float32)
    with pytest.raises(ConversionError, match=r"missing \['decoder.final_layernorm.weight'\], unexpected "
                                              r"\['decoder.layers.2.mlp.linear_fc2.weight'\], wrong shapes "
                                              r"\['decoder.layers.0.mlp.linear_fc1.weight \(6, 8\) != \(12, 8\)'\]"):
        _check_slots(slots, GQA, "policy")


def test_export_targets_and_sources_are_checked(tmp_path):
    check_export_dir(str(tmp_path / "new"))
    (tmp_path / "earlier").mkdir()
    (tmp_path / "earlier" / EXPORT_MARKER).write_text("")
    check_export_dir(str(tmp_path / "earlier"))  # an earlier export of ours is replaced
    (tmp_path / "notes.txt").write_text("mine")
    # A user's directory, even one holding a config.json (issue 12: it used to be deleted), is refused.
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ConversionError, match="is not empty and has no .megatron_dpo_export marker"):
        check_export_dir(str(tmp_path))
    with pytest.raises(ConversionError, match="is not a megatron_dpo checkpoint .needs model_arch.json and policy/"):
        read_architecture(str(tmp_path))


def test_export_needs_checkpointing():
    with pytest.raises(ConfigError, match="export_hf_dir needs checkpointing.enabled=true"):
        load_config(None, ["checkpointing.export_hf_dir=/tmp/x", "checkpointing.enabled=false"])


def test_shard_sizes_parse_in_binary_units():
    assert parse_size("5GB") == 5 * 2**30 and parse_size("500 mb") == 500 * 2**20 and parse_size("1000") == 1000
    with pytest.raises(Exception, match="invalid size"):
        parse_size("five")


def test_presets_export_as_llama():
    arch = presets.preset_architecture("tiny-llama", vocab_size=768)
    assert registry.hf_config_from_architecture(arch)["model_type"] == "llama"
