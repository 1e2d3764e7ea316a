"""scripts/convert_hf_to_megatron.py and convert_megatron_to_hf.py as a user
runs them: a round trip that returns the same tensors, and a clear error
(exit 2, no traceback) for an architecture it does not convert."""

import json
import os
import subprocess
import sys

import torch

from tests.conftest import REPO
from tests.hf_models import TINY, hf_tensors, save_hf_model


def convert(script: str, *args):
    command = [sys.executable, os.path.join(REPO, "scripts", script), *args]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)


def test_round_trip_through_the_scripts(tmp_path):
    hf_dir, megatron_dir, export_dir = (str(tmp_path / name) for name in ("hf", "megatron", "export"))
    save_hf_model(hf_dir, "mistral", **TINY, sliding_window=4096)
    imported = convert("convert_hf_to_megatron.py", "--hf-dir", hf_dir, "--out", megatron_dir)
    assert imported.returncode == 0, imported.stderr[-3000:]
    assert sorted(os.listdir(megatron_dir)) == ["model_arch.json", "policy", "tokenizer"]
    exported = convert("convert_megatron_to_hf.py", "--checkpoint", megatron_dir, "--out", export_dir)
    assert exported.returncode == 0, exported.stderr[-3000:]
    original, round_trip = hf_tensors(hf_dir), hf_tensors(export_dir)
    assert sorted(round_trip) == sorted(original)
    assert all(torch.equal(round_trip[key], original[key]) for key in original)
    with open(os.path.join(export_dir, "config.json")) as handle:
        config = json.load(handle)
    assert config["architectures"] == ["MistralForCausalLM"] and config["sliding_window"] == 4096


def test_unsupported_architecture_is_named_with_the_supported_ones(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    result = convert("convert_hf_to_megatron.py", "--hf-dir", str(tmp_path), "--out", str(tmp_path / "out"))
    assert result.returncode == 2
    assert ("unsupported architecture 'GPT2LMHeadModel'; supported: LlamaForCausalLM, MistralForCausalLM, "
            "Qwen2ForCausalLM, Qwen3ForCausalLM") in result.stderr
    assert "Traceback" not in result.stderr and not os.path.exists(tmp_path / "out")
