"""HF export targets: only a new, empty or earlier-export directory (marker)
is written; nothing megatron_dpo did not create is deleted."""

import json
import os

import pytest

from megatron_dpo.checkpoint.hf_export import EXPORT_MARKER, publish, work_dir, check_export_dir, megatron_to_hf
from megatron_dpo.models.conversion import ConversionError

ARCH = {"add_qkv_bias": False, "ffn_hidden_size": 176, "hf_architecture": "LlamaForCausalLM", "hidden_size": 64,
        "kv_channels": None, "max_position_embeddings": 1024, "norm_epsilon": 1e-05, "num_attention_heads": 4,
        "num_layers": 4, "num_query_groups": 2, "qk_layernorm": False, "rope_scaling_factor": None,
        "rotary_base": 10000.0, "sliding_window": None, "tie_word_embeddings": False, "vocab_size": 768}


def _files(directory) -> dict:
    found = {}
    for root, _, names in os.walk(directory):
        for name in names:
            path = os.path.join(root, name)
            with open(path) as handle:
                found[os.path.relpath(path, directory)] = handle.read()
    return found


def _make(directory, files) -> str:
    os.makedirs(directory, exist_ok=True)
    for name, text in files.items():
        with open(os.path.join(directory, name), "w") as handle:
            handle.write(text)
    return str(directory)


def _checkpoint(tmp_path) -> str:
    directory = tmp_path / "step_5"
    (directory / "policy").mkdir(parents=True)
    (directory / "model_arch.json").write_text(json.dumps(ARCH))
    return str(directory)


def test_user_directory_is_refused_and_untouched_with_its_partial_sibling(tmp_path):
    user = _make(tmp_path / "models", {"config.json": "{}", "notes.txt": "mine"})
    sibling = _make(tmp_path / "models.partial", {"draft.txt": "also mine"})
    with pytest.raises(ConversionError, match=rf"Export directory '{user}' is not empty and has no "
                                              rf"{EXPORT_MARKER} marker"):
        check_export_dir(user)
    with pytest.raises(ConversionError, match="is not empty"):
        megatron_to_hf(_checkpoint(tmp_path), user)
    assert _files(user) == {"config.json": "{}", "notes.txt": "mine"}
    assert _files(sibling) == {"draft.txt": "also mine"}


def test_base_model_directory_is_refused_as_export_target(tmp_path):
    base = _make(tmp_path / "llama", {"config.json": "{}", "model.safetensors": "weights"})
    with pytest.raises(ConversionError, match="is not empty and has no"):
        check_export_dir(base)
    with pytest.raises(ConversionError, match=rf"would replace '{base}', which this run reads"):
        check_export_dir(base, (base,))
    earlier_export = _make(tmp_path / "dpo1", {EXPORT_MARKER: "{}", "config.json": "{}"})
    check_export_dir(earlier_export)  # replaceable as a target...
    with pytest.raises(ConversionError, match=rf"would replace '{earlier_export}', which this run reads"):
        check_export_dir(earlier_export, (earlier_export,))  # ...but not while the run starts from it
    with pytest.raises(ConversionError, match="which this run reads"):
        check_export_dir(str(tmp_path), (os.path.join(earlier_export, "sub"),))  # nor a directory above it
    check_export_dir(os.path.join(base, "dpo"), (base,))  # a new directory inside is fine
    assert _files(base) == {"config.json": "{}", "model.safetensors": "weights"}


def test_earlier_export_is_replaced_through_a_temporary_directory(tmp_path):
    out = _make(tmp_path / "export", {EXPORT_MARKER: "{}", "model.safetensors": "old", "stale.json": "old"})
    check_export_dir(out)
    tmp = _make(work_dir(out, "partial"), {EXPORT_MARKER: "{}", "model.safetensors": "new"})
    publish(tmp, out)
    assert _files(out) == {EXPORT_MARKER: "{}", "model.safetensors": "new"}
    assert sorted(os.listdir(tmp_path)) == ["export"]  # no work directory left behind
    empty = tmp_path / "empty"
    empty.mkdir()
    publish(_make(work_dir(empty, "partial"), {EXPORT_MARKER: "{}"}), str(empty))
    assert _files(empty) == {EXPORT_MARKER: "{}"}


def test_files_that_appear_during_training_or_in_work_directories_are_kept(tmp_path):
    out = _make(tmp_path / "export", {})
    check_export_dir(out)  # at startup: empty
    (tmp_path / "export" / "user.txt").write_text("mine")
    tmp = _make(work_dir(out, "partial"), {EXPORT_MARKER: "{}", "model.safetensors": "new"})
    with pytest.raises(ConversionError, match="is not empty"):
        publish(tmp, out)
    assert _files(out) == {"user.txt": "mine"}
    other = _make(tmp_path / "other", {})
    _make(work_dir(other, "old"), {"user.txt": "mine"})
    with pytest.raises(ConversionError, match=r"\.other\.megatron_dpo_old' \(the exporter's work directory"):
        check_export_dir(other)
    assert _files(work_dir(other, "old")) == {"user.txt": "mine"}
