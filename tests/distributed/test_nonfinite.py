"""A step whose loss or gradient norm is NaN applies no update and leaves the
LR schedule alone (counted as skipped_steps); dpo.max_consecutive_nonfinite
such steps in a row abort the run with exit code 3 and a message."""

import os
import re

from tests.conftest import REPO, TINY_OVERRIDES, read_jsonl, torchrun

SCRIPT = os.path.join(REPO, "tests", "distributed", "scripts", "nonfinite.py")


def test_nonfinite_steps_are_skipped_then_the_run_aborts(tmp_path):
    run_dir = os.path.join(tmp_path, "run")
    args = ["--config", os.path.join(REPO, "configs", "dpo.yaml"), *TINY_OVERRIDES,
            f"checkpointing.checkpoint_dir={run_dir}", "dpo.max_num_steps=8", "policy.train_global_batch_size=8",
            "policy.train_micro_batch_size=2", "dpo.max_consecutive_nonfinite=3", "checkpointing.enabled=false"]
    result = torchrun(2, SCRIPT, args, check=False)
    updates = re.findall(r"UPDATE step=(\d+) updated=(\w+) params_changed=(\w+)", result.stdout)
    # Steps 2 (NaN grad) and 3 (NaN loss) skipped, 4 trains, 5-7 skipped: abort.
    assert [(int(s), u == "True", c == "True") for s, u, c in updates] == [
        (1, True, True), (2, False, False), (3, False, False), (4, True, True),
        (5, False, False), (6, False, False), (7, False, False),
    ]
    assert result.returncode != 0
    assert "error: 3 consecutive steps (up to step 7) had a non-finite loss or gradient norm" in result.stderr
    assert "dpo.max_consecutive_nonfinite=3" in result.stderr and "]: Traceback" not in result.stderr
    records = read_jsonl(os.path.join(run_dir, "metrics.jsonl"))
    assert [r["skipped_steps"] for r in records] == [0, 1, 2, 2, 3, 4, 5]
    # No update, no LR schedule step: steps 2 and 3 run at step 1's warmup LR.
    lrs = [r["lr"] for r in records]
    assert lrs[0] == lrs[1] == lrs[2] < lrs[3]


def test_nonfinite_steps_are_never_saved_and_the_abort_names_the_last_good_one(tmp_path):
    """Issue 12: a skipped step is not checkpointed (so retention can never
    keep only poisoned steps), and the abort says where to resume from."""
    run_dir = os.path.join(tmp_path, "run")
    args = ["--config", os.path.join(REPO, "configs", "dpo.yaml"), *TINY_OVERRIDES,
            f"checkpointing.checkpoint_dir={run_dir}", "dpo.max_num_steps=8", "policy.train_global_batch_size=8",
            "policy.train_micro_batch_size=2", "dpo.max_consecutive_nonfinite=3", "checkpointing.save_period=1",
            "checkpointing.keep_top_k=1", "checkpointing.metric_name=train:loss"]
    result = torchrun(2, SCRIPT, args, check=False)
    assert result.returncode != 0 and "(exitcode: 3)" in result.stderr, result.stderr[-3000:]  # the ranks' code
    steps = sorted(int(name[5:]) for name in os.listdir(run_dir) if re.fullmatch(r"step_\d+", name))
    assert 4 in steps and not set(steps) & {2, 3, 5, 6, 7}, steps
    last_good = os.path.join(run_dir, "step_4")
    assert f"The last good checkpoint is step 4 ({last_good})" in result.stderr
    assert f"checkpointing.resume={last_good}" in result.stderr and "--nproc_per_node=2" in result.stderr
