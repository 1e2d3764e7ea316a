"""reference.mode: cached reproduces online's metrics (train and validation)
with a cache that scripts/precompute_reference.py wrote under another layout
(DP=2, training PP=2) and training reused; none is reference-free; dpo and
ipo run end to end."""

import math
import os

import pytest

from tests.conftest import REPO, TINY_OVERRIDES, run_dpo, torchrun
from tests.e2e.conftest import assert_same_records

PRECOMPUTE = os.path.join(REPO, "scripts", "precompute_reference.py")
# fp32, 3 steps and a validation at the end.
COMMON = ["dpo.max_num_steps=3", "checkpointing.enabled=false", "dpo.val_at_end=true", "dpo.val_batches=1"]
PP2 = "policy.megatron_cfg.pipeline_model_parallel_size=2"


def test_cached_reference_matches_online(tmp_path):
    online, _ = run_dpo(tmp_path / "online", 2, [*COMMON, PP2])
    run_dir = tmp_path / "cached" / "run"
    args = ["--config", os.path.join(REPO, "configs", "dpo.yaml"), *TINY_OVERRIDES, *COMMON,
            f"checkpointing.checkpoint_dir={run_dir}", "reference.mode=cached"]
    precomputed = torchrun(2, PRECOMPUTE, args)  # DP=2
    assert "reference cache for train: missing" in precomputed.stderr
    assert len(os.listdir(run_dir / "reference_cache")) == 2  # train and val
    cached, result = run_dpo(tmp_path / "cached", 2, [*COMMON, PP2, "reference.mode=cached"])
    assert "reference cache for train: loaded" in result.stderr
    assert "reference cache for val: loaded" in result.stderr
    assert online[0]["preference_loss"] == pytest.approx(math.log(2), abs=1e-6)
    # Every metric (not timing) within 1e-6; rewards are 0 at step 1, hence abs too.
    assert_same_records(online, cached, rel=1e-6, abs=1e-6)


def test_reference_free_ipo(tmp_path):
    records, _ = run_dpo(tmp_path, 1, ["dpo.max_num_steps=2", "checkpointing.enabled=false",
                                       "loss_fn.preference_loss=ipo", "reference.mode=none"])
    first = records[0]
    # With a reference the first step's rewards are 0 (policy == reference);
    # reference-free they are beta x the policy's per-token mean log-probs.
    assert first["chosen_reward"] < 0 and first["rejected_reward"] < 0 and first["reward_margin"] != 0
    assert first["preference_loss"] != pytest.approx(25.0)  # (1 / (2 beta))^2: the online value
    assert [r["step"] for r in records] == [1, 2] and all(math.isfinite(r["loss"]) for r in records)
