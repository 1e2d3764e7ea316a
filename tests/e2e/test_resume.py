"""A run continues from a checkpoint exactly as if never stopped (DESIGN.md
ladder step 6); resharding to another TP/PP loses nothing; a checkpoint of
other data is refused; resume=never keeps the earlier run's files;
keep_top_k ranks by a metric."""

import json
import os
import shutil

import pytest

from tests.conftest import run_dpo
from tests.e2e.conftest import FULLY_RESHARDABLE, RESUMABLE, assert_same_records

# Steps computed at another TP/PP reorder fp32 reductions: an uninterrupted
# TP2 run differs from the DP2 one by up to 9e-7 (loss), 1.8e-6 (grad norm)
# and 4e-6 (rewards) relative; DESIGN.md's layout tolerance is 1e-5.
LAYOUT_TOLERANCE = 1e-5
TP2 = "policy.megatron_cfg.tensor_model_parallel_size=2"


def _killed_after_step_3(source_dir: str, run_dir: str) -> None:
    """The run directory of a run killed during step 5, after saving step 3 and
    while writing step 4's checkpoint and step 5's metrics line."""
    os.makedirs(run_dir)
    for step in (1, 2, 3):
        shutil.copytree(os.path.join(source_dir, f"step_{step}"), os.path.join(run_dir, f"step_{step}"))
    shutil.copytree(os.path.join(source_dir, "step_4", "policy"), os.path.join(run_dir, ".tmp_step_4", "policy"))
    with open(os.path.join(source_dir, "metrics.jsonl")) as source:
        lines = source.readlines()[:4]
    with open(os.path.join(run_dir, "metrics.jsonl"), "w") as target:
        target.writelines(lines + ['{"step": 5, "split": "tra'])


def test_resume_after_step_3_equals_the_uninterrupted_run(uninterrupted, tmp_path):
    expected, source_dir = uninterrupted
    run_dir = os.path.join(tmp_path, "run")
    _killed_after_step_3(source_dir, run_dir)
    records, result = run_dpo(tmp_path, 2, RESUMABLE)
    assert f"resumed from {run_dir}/step_3 (step 3, 24 pairs seen)" in result.stdout
    assert "incomplete checkpoint" in result.stderr and not os.path.exists(os.path.join(run_dir, ".tmp_step_4"))
    assert_same_records(expected, records)


@pytest.mark.parametrize("layout", [TP2, "policy.megatron_cfg.pipeline_model_parallel_size=2"])
def test_resume_at_another_layout(uninterrupted, tmp_path, layout):
    expected, source_dir = uninterrupted
    records, _ = run_dpo(tmp_path, 2, [*RESUMABLE, layout, f"checkpointing.resume={source_dir}/step_3"])
    assert_same_records(expected[3:], records, rel=LAYOUT_TOLERANCE)


def test_resharding_to_tp2_and_back_loses_nothing(uninterrupted, tmp_path):
    """DP2 step_3 loaded at TP2 and saved again (no step), then continued at
    DP2: the uninterrupted run's numbers, with no layout noise."""
    expected, source_dir = uninterrupted
    tp2_dir = os.path.join(tmp_path, "tp2", "run")
    run_dpo(tmp_path / "tp2", 2, [*RESUMABLE, TP2, "dpo.max_num_steps=3", f"checkpointing.resume={source_dir}/step_3",
                                  FULLY_RESHARDABLE])
    records, _ = run_dpo(tmp_path, 2, [*RESUMABLE, f"checkpointing.resume={tp2_dir}/step_3"])
    assert_same_records(expected[3:], records)


def test_resume_on_other_data_is_refused_unless_allowed(uninterrupted, tmp_path):
    _, source_dir = uninterrupted
    train_path = os.path.join(tmp_path, "train.jsonl")
    with open("data/demo/train.jsonl") as source, open(train_path, "w") as target:
        target.writelines(source.readlines()[:64])
    overrides = [*RESUMABLE, f"checkpointing.resume={source_dir}/step_3", f"data.train_data_path={train_path}"]
    _, refused = run_dpo(tmp_path, 2, overrides, check=False)
    # The ranks exit 2 with the message and no traceback (torchrun then prints its own).
    assert refused.returncode != 0 and "]: Traceback" not in refused.stderr
    assert "error: cannot resume from" in refused.stderr and "training data (data.train_data_path" in refused.stderr
    assert "checkpointing.allow_config_change=true" in refused.stderr
    records, _ = run_dpo(tmp_path, 2, [*overrides, "checkpointing.allow_config_change=true"])
    # 64 pairs make 8 steps of one epoch: steps 4..8 continue at pair 24.
    assert [r["step"] for r in records] == [4, 5, 6, 7, 8]


def test_never_moves_the_earlier_run_aside_and_keep_top_k_ranks_by_metric(uninterrupted, tmp_path):
    _, source_dir = uninterrupted
    run_dir = os.path.join(tmp_path, "run")
    shutil.copytree(source_dir, run_dir)
    overrides = [*RESUMABLE, "checkpointing.resume=never", "checkpointing.save_period=1", "checkpointing.keep_top_k=1",
                 "checkpointing.metric_name=train:loss", "checkpointing.higher_is_better=true"]
    records, _ = run_dpo(tmp_path, 2, overrides)
    assert [r["step"] for r in records] == list(range(1, 9))
    (previous,) = [name for name in os.listdir(run_dir) if name.startswith("previous_run_")]
    assert {f"step_{s}" for s in range(1, 9)} | {"metrics.jsonl"} <= set(os.listdir(os.path.join(run_dir, previous)))
    # The loss falls: the highest is step 1's; the newest is always kept.
    assert sorted(name for name in os.listdir(run_dir) if name.startswith("step_")) == ["step_1", "step_8"]
    with open(os.path.join(run_dir, "step_1", "train_state.json")) as handle:
        assert json.load(handle)["metrics"]["train:loss"] == records[0]["loss"]


OVERLAP = ["policy.megatron_cfg.distributed_data_parallel_config.overlap_grad_reduce=true",
           "policy.megatron_cfg.distributed_data_parallel_config.overlap_param_gather=true"]


def test_overlapped_run_saves_the_updated_parameters(uninterrupted, tmp_path):
    """With overlap_param_gather the optimizer step leaves other ranks' shards
    to the next forward; the save must gather them first. The overlapped run
    (saving the default dp_reshardable optimizer state, on the plain torch
    Adam path), and its step 3 continued without overlap: the uninterrupted
    run's numbers. At TP2 that checkpoint is refused, naming the option."""
    expected, _ = uninterrupted
    overlapped, _ = run_dpo(tmp_path / "overlap", 2, [*RESUMABLE, *OVERLAP, "checkpointing.save_period=3"])
    assert_same_records(expected, overlapped)
    step_3 = os.path.join(str(tmp_path), "overlap", "run", "step_3")
    records, _ = run_dpo(tmp_path, 2, [*RESUMABLE, f"checkpointing.resume={step_3}"])
    assert_same_records(expected[3:], records)
    _, result = run_dpo(tmp_path / "tp2", 2, [*RESUMABLE, TP2, f"checkpointing.resume={step_3}"], check=False)
    assert result.returncode != 0 and "checkpointing.optimizer_format=fully_reshardable" in result.stderr


def test_async_save_writes_what_a_sync_save_writes(uninterrupted, tmp_path):
    """checkpointing.async_save: the uninterrupted run's step 5 continued with
    a save after every step, written in the background (after the first) and
    completed (manifest, rename) before the next save or at the end: the same metrics,
    and step 8's shards and RNG files byte for byte those of the sync save."""
    expected, source_dir = uninterrupted
    records, result = run_dpo(tmp_path, 2, [*RESUMABLE, FULLY_RESHARDABLE, "checkpointing.save_period=1",
                                            "checkpointing.async_save=true", f"checkpointing.resume={source_dir}/step_5"])
    assert_same_records(expected[5:], records)
    # The first save (step 6) is waited for in full: the time budget needs its length.
    assert result.stdout.count("written in the background") == 2 and "step_6 in " in result.stdout
    run_dir = os.path.join(str(tmp_path), "run")
    assert not [name for name in os.listdir(run_dir) if name.startswith(".tmp_")]
    saved = {}
    for directory in (os.path.join(source_dir, "step_8"), os.path.join(run_dir, "step_8")):
        with open(os.path.join(directory, "manifest.json")) as handle:
            files = json.load(handle)["files"]
        # DCP's .metadata holds a save id; config.yaml and train_state.json the settings and timings.
        saved[directory] = {name: entry for name, entry in files.items()
                            if name.endswith((".distcp", ".pt")) and name != "policy/.metadata"}
    sync, async_ = saved.values()
    assert len(sync) > 4 and async_ == sync
