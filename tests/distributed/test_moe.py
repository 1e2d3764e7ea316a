"""Mixture-of-Experts models (Mixtral, Qwen3-MoE): HF <-> megatron conversion
checked against transformers on tiny random models (4 experts, top-2, GQA,
Qwen3's q/k norms and head_dim != hidden / heads), under expert, tensor and
pipeline parallel layouts."""

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO, torchrun
from tests.hf_models import TINY, hf_tensors, save_hf_model

MOE_TINY = dict(TINY, num_hidden_layers=2, num_experts_per_tok=2)
FAMILIES = {
    "mixtral": ("mixtral", dict(num_local_experts=4)),
    "qwen3_moe": ("qwen3_moe", dict(num_experts=4, moe_intermediate_size=48, head_dim=32, norm_topk_prob=True)),
}
SCRIPTS = os.path.join(REPO, "tests", "distributed", "scripts")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """ROOT with hf_NAME, megatron_NAME (converted) and roundtrip_NAME (exported back, 20 kB files)."""
    root = str(tmp_path_factory.mktemp("moe_conversion"))
    for name, (model_type, extra) in FAMILIES.items():
        save_hf_model(os.path.join(root, f"hf_{name}"), model_type, **MOE_TINY, **extra)
    env = dict(os.environ, PYTHONPATH=REPO, CUDA_VISIBLE_DEVICES="")
    subprocess.run([sys.executable, os.path.join(SCRIPTS, "convert_models.py"), root, str(20_000), *FAMILIES],
                   cwd=REPO, check=True, capture_output=True, timeout=300, env=env)
    return root


@pytest.mark.parametrize("name", FAMILIES)
def test_moe_hf_megatron_hf_round_trip_is_bit_exact(models, name):
    original, exported = hf_tensors(os.path.join(models, f"hf_{name}")), hf_tensors(os.path.join(models, f"roundtrip_{name}"))
    assert sorted(exported) == sorted(original)
    assert sum(".experts.3." in key for key in original) == 2 * 3  # per layer: gate, up, down of the last expert
    changed = [key for key in original if not torch.equal(exported[key], original[key])]
    assert not changed, f"tensors changed by the round trip: {changed}"


def test_moe_logits_match_transformers_under_expert_parallel_layouts(models, tmp_path):
    out = str(tmp_path / "logits.json")
    specs = [f"{name}={models}/hf_{name},{models}/megatron_{name}" for name in FAMILIES]
    torchrun(4, os.path.join(SCRIPTS, "moe_conversion_logits.py"), [out, *specs], timeout=400)
    with open(out) as handle:
        errors = json.load(handle)
    print(json.dumps(errors, indent=1))
    for name in FAMILIES:
        assert len(errors[name]) == 5  # converted checkpoint: EP1, EP2, TP2, EP2xPP2; HF dir: EP2xPP2
        assert all(0 <= error < 1e-4 for error in errors[name].values()), (name, errors[name])
