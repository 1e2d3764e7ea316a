"""Config mistakes stop the run before any work, with a message that names the
key, the numbers and the fix (exit code 2, no traceback)."""

import os
import subprocess
import sys

from tests.conftest import REPO, RUN_DPO, TINY_OVERRIDES, torchrun


def run_python_cli(tmp_path, *overrides):
    args = [sys.executable, RUN_DPO, *TINY_OVERRIDES, f"checkpointing.checkpoint_dir={tmp_path}/run", *overrides]
    return subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=300)


def test_misspelt_key_suggests_the_valid_one(tmp_path):
    result = run_python_cli(tmp_path, "loss_fn.refrence_policy_kl_penalty=0.1")
    assert result.returncode == 2
    assert "loss_fn.refrence_policy_kl_penalty" in result.stderr
    assert "Did you mean 'loss_fn.reference_policy_kl_penalty'" in result.stderr
    assert "Traceback" not in result.stderr
    assert not os.path.exists(tmp_path / "run")


def test_global_batch_not_divisible_by_micro_times_dp(tmp_path):
    result = run_python_cli(tmp_path, "policy.train_global_batch_size=10", "policy.train_micro_batch_size=4")
    assert result.returncode == 2
    assert "10" in result.stderr and "4" in result.stderr and "policy.train_global_batch_size" in result.stderr


def test_tp_not_dividing_heads_under_torchrun(tmp_path):
    args = ["--config", os.path.join(REPO, "configs", "dpo.yaml"), *TINY_OVERRIDES,
            f"checkpointing.checkpoint_dir={tmp_path}/run", "policy.megatron_cfg.tensor_model_parallel_size=3"]
    result = torchrun(3, RUN_DPO, args, timeout=300, check=False)
    assert result.returncode != 0
    assert "policy.megatron_cfg.tensor_model_parallel_size" in result.stderr
    assert "3" in result.stderr and "heads" in result.stderr
    # torchrun reports the failed child with its own traceback; the ranks print none.
    assert "error: " in result.stderr and "]: Traceback" not in result.stderr
