"""A LoRA run continues from its adapter-only checkpoint exactly as if never
stopped (also under the distributed optimizer on DP=2, and at TP2); its
checkpoint holds no base weights; resuming it on another base is refused by name."""

import os

import pytest

from tests.conftest import run_dpo
from tests.e2e.conftest import RESUMABLE, assert_same_records

LORA = ["policy.lora_cfg.enabled=true", "policy.lora_cfg.dim=4", "policy.lora_cfg.alpha=8",
        "policy.lora_cfg.target_modules=[linear_qkv,linear_proj,linear_fc1,linear_fc2]",
        "policy.megatron_cfg.optimizer.lr=1e-2", "dpo.max_num_steps=4"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("lora_uninterrupted")
    # Resumed at TP2 below: the distributed optimizer's state saved reshardable at any layout.
    records, _ = run_dpo(tmp_path, 2, [*RESUMABLE, *LORA, "checkpointing.save_period=2",
                                       "checkpointing.optimizer_format=fully_reshardable"])
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    return records, os.path.join(str(tmp_path), "run")


def test_checkpoint_holds_adapters_only(uninterrupted):
    from megatron.core import dist_checkpointing

    _, run_dir = uninterrupted
    keys = dist_checkpointing.load_tensors_metadata(os.path.join(run_dir, "step_2", "policy"))
    model_keys = [key for key in keys if not key.startswith("optimizer.")]
    assert model_keys and all(".lora." in key for key in model_keys), sorted(model_keys)[:5]
    # The optimizer state is the adapters' too (keyed by parameter name when fully reshardable).
    assert all(".lora." in key for key in keys if key.startswith("optimizer.state.")), sorted(keys)[:5]


@pytest.mark.parametrize("layout", [[], ["policy.megatron_cfg.tensor_model_parallel_size=2"]])
def test_resume_equals_the_uninterrupted_run(uninterrupted, tmp_path, layout):
    expected, run_dir = uninterrupted
    records, result = run_dpo(tmp_path, 2, [*RESUMABLE, *LORA, *layout, f"checkpointing.resume={run_dir}/step_2"])
    assert "resumed from" in result.stdout
    assert_same_records(expected[2:], records, rel=1e-5 if layout else 1e-6)


def test_resume_on_another_base_is_refused(uninterrupted, tmp_path):
    _, run_dir = uninterrupted
    _, result = run_dpo(tmp_path, 1, [*LORA, "dpo.seed=7",
                                      f"checkpointing.resume={run_dir}/step_2"], check=False)
    assert result.returncode != 0
    output = result.stderr + result.stdout
    assert "cannot resume" in output and "LoRA on tiny-llama (fingerprint" in output
