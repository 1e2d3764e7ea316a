"""DESIGN.md ladder step 5: the README demo (configs/dpo.yaml on the embedded
data, 2 ranks) learns: held-out accuracy goes from 0 (policy == reference)
to >= 0.9, and step 1 is exactly ln 2."""

import json
import math
import os

import pytest

from tests.conftest import REPO, RUN_DPO, read_jsonl, torchrun


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    run_dir = str(tmp_path_factory.mktemp("demo") / "dpo")
    args = ["--config", os.path.join(REPO, "configs", "dpo.yaml"), f"checkpointing.checkpoint_dir={run_dir}"]
    result = torchrun(2, RUN_DPO, args, timeout=600)
    return run_dir, read_jsonl(os.path.join(run_dir, "metrics.jsonl")), result


def test_step1_preference_loss_is_ln2(demo_run):
    _, records, _ = demo_run
    first = next(r for r in records if r["split"] == "train")
    assert first["step"] == 1
    assert round(first["preference_loss"], 4) == round(math.log(2), 4)


def test_heldout_accuracy_rises_from_zero_to_at_least_0_9(demo_run):
    _, records, _ = demo_run
    val = [r for r in records if r["split"] == "val"]
    assert val[0]["step"] == 0 and val[0]["accuracy"] == 0.0
    assert val[-1]["accuracy"] >= 0.9
    assert val[-1]["preference_loss"] < 0.3


def test_metrics_have_the_design_names(demo_run):
    _, records, _ = demo_run
    names = {"loss", "preference_loss", "sft_loss", "chosen_reward", "rejected_reward", "reward_margin",
             "accuracy", "chosen_logps", "rejected_logps", "grad_norm", "lr", "tokens_per_sec", "step_time"}
    train = [r for r in records if r["split"] == "train"]
    assert names <= set(train[0])
    assert [r["step"] for r in train] == list(range(1, len(train) + 1))


def test_run_dir_layout(demo_run):
    run_dir, records, result = demo_run
    last_step = max(r["step"] for r in records)
    step_dir = os.path.join(run_dir, f"step_{last_step}")
    for name in ("config.yaml", "model_arch.json", "train_state.json", "tokenizer", "policy"):
        assert os.path.exists(os.path.join(step_dir, name)), name
    with open(os.path.join(step_dir, "train_state.json")) as handle:
        assert json.load(handle)["step"] == last_step
    assert os.path.isfile(os.path.join(run_dir, "config.yaml"))
    assert os.path.isfile(os.path.join(run_dir, "summary.json"))
    assert any(name.startswith("events.out.tfevents") for _, _, files in os.walk(os.path.join(run_dir, "logs")) for name in files)
    assert run_dir in result.stdout


def test_plot_of_the_real_run_has_every_panel(demo_run, tmp_path):
    from megatron_dpo.logging.plots import PANELS, plot_metrics

    run_dir, _, _ = demo_run
    assert os.path.getsize(os.path.join(run_dir, "metrics.png")) > 50_000  # written by the run itself
    out_path, titles = plot_metrics(run_dir, str(tmp_path / "again.png"))
    assert titles == [panel.title for panel in PANELS]
    assert os.path.getsize(out_path) > 50_000


def test_tensorboard_has_the_same_tags_as_metrics_jsonl(demo_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, records, _ = demo_run
    jsonl_tags = {f"{r['split']}/{name}" for r in records for name in r if name not in ("step", "split")}
    accumulator = EventAccumulator(os.path.join(run_dir, "logs"), size_guidance={"scalars": 0})
    accumulator.Reload()
    assert set(accumulator.Tags()["scalars"]) == jsonl_tags
    steps = [event.step for event in accumulator.Scalars("train/preference_loss")]
    assert steps == [r["step"] for r in records if r["split"] == "train"]
