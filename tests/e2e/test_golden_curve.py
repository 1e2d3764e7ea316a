"""A golden curve (torchtitan's loss files): the first 10 training losses and
gradient norms of the tiny fp32 demo config are pinned in
tests/assets/golden_demo_fp32.json, so a refactor that changes the numbers
fails loudly instead of drifting."""

import json
import math
import os

import pytest

from tests.conftest import REPO, RUN_DPO, read_jsonl, torchrun

GOLDEN = os.path.join(REPO, "tests", "assets", "golden_demo_fp32.json")


def test_demo_config_reproduces_the_golden_curve(tmp_path):
    with open(GOLDEN) as handle:
        golden = json.load(handle)
    run_dir = str(tmp_path / "run")
    args = ["--config", os.path.join(REPO, "configs", "dpo.yaml"), *golden["command_overrides"],
            "logger.tensorboard_enabled=false", "logger.plot_enabled=false", f"checkpointing.checkpoint_dir={run_dir}"]
    torchrun(golden["nproc"], RUN_DPO, args)
    train = [r for r in read_jsonl(os.path.join(run_dir, "metrics.jsonl")) if r["split"] == "train"]
    assert [r["step"] for r in train] == list(range(1, len(golden["loss"]) + 1))
    assert golden["loss"][0] == pytest.approx(math.log(2), abs=1e-6)  # policy == reference at step 1
    for name in ("loss", "grad_norm"):
        assert [r[name] for r in train] == pytest.approx(golden[name], rel=1e-6, abs=1e-7), name
