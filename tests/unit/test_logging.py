"""The metrics path (metrics.jsonl, TensorBoard, W&B) and console output."""

import importlib.util
import json
import math
import os
import sys

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from megatron_dpo.config.schema import LoggerConfig
from megatron_dpo.logging import (
    MetricsLogger,
    Progress,
    format_step_line,
    format_val_line,
    print_summary,
    print_val_samples,
    read_metrics,
    write_summary,
)

requires_wandb = pytest.mark.skipif(
    importlib.util.find_spec("wandb") is None,
    reason="wandb not installed: pip install 'megatron_dpo[wandb]'",
)

TRAIN = {"loss": 0.6931, "preference_loss": 0.6931, "sft_loss": 0.0, "accuracy": 0.0,
         "reward_margin": 0.0, "lr": 1e-4, "grad_norm": 1.234, "tokens_per_sec": 512.4,
         "step_time": 0.123}
VAL = {"loss": 0.65, "accuracy": 0.625, "reward_margin": 0.08}


def _log_run(run_dir, cfg, num_steps=3, **kwargs):
    logger = MetricsLogger(str(run_dir), cfg, enabled=True, **kwargs)
    for step in range(1, num_steps + 1):
        logger.log(step, "train", {**TRAIN, "loss": TRAIN["loss"] / step})
    logger.log(num_steps, "val", VAL)
    logger.log(num_steps, "val/heldout", VAL)
    logger.close()


def test_jsonl_lines_have_step_split_and_metric_names(tmp_path):
    _log_run(tmp_path, LoggerConfig(tensorboard_enabled=False))
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [(r["step"], r["split"]) for r in records] == [
        (1, "train"), (2, "train"), (3, "train"), (3, "val"), (3, "val/heldout")]
    assert set(records[0]) == {"step", "split", *TRAIN}
    assert records[1]["loss"] == pytest.approx(TRAIN["loss"] / 2)
    assert set(records[3]) == {"step", "split", *VAL}


def test_tensorboard_scalars_have_the_same_tags_and_values_as_jsonl(tmp_path):
    _log_run(tmp_path, LoggerConfig(log_dir="tb"))
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    expected = {}
    for record in read_metrics(str(tmp_path / "metrics.jsonl")):
        for name, value in record.items():
            if name not in ("step", "split"):
                expected.setdefault(f"{record['split']}/{name}", []).append((record["step"], value))
    assert set(events.Tags()["scalars"]) == set(expected)
    for tag, points in expected.items():
        got = [(e.step, e.value) for e in events.Scalars(tag)]
        assert got == [(step, pytest.approx(value, rel=1e-6)) for step, value in points]


def test_absolute_log_dir_is_used_as_is(tmp_path):
    _log_run(tmp_path / "run", LoggerConfig(log_dir=str(tmp_path / "elsewhere")))
    assert any(name.startswith("events.") for name in os.listdir(tmp_path / "elsewhere"))
    assert not (tmp_path / "run" / "logs").exists()


def test_disabled_logger_writes_nothing(tmp_path):
    run_dir = tmp_path / "run"
    logger = MetricsLogger(str(run_dir), LoggerConfig(wandb_enabled=True), enabled=False)
    logger.log(1, "train", TRAIN)
    logger.close()
    assert not run_dir.exists()


def test_resumed_run_appends_and_drops_records_past_the_checkpoint(tmp_path):
    cfg = LoggerConfig()
    _log_run(tmp_path, cfg, num_steps=4)  # train 1..4, val at 4; checkpoint at 2
    logger = MetricsLogger(str(tmp_path), cfg, enabled=True, resume_step=2)
    logger.log(3, "train", {"loss": 0.5})
    logger.close()
    records = read_metrics(str(tmp_path / "metrics.jsonl"))
    assert [(r["step"], r["split"]) for r in records] == [(1, "train"), (2, "train"), (3, "train")]
    events = EventAccumulator(str(tmp_path / "logs"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [
        (1, pytest.approx(TRAIN["loss"])), (2, pytest.approx(TRAIN["loss"] / 2)), (3, 0.5)]
    assert events.Scalars("val/loss") == []


def test_partial_last_line_of_a_killed_run_is_dropped_before_appending(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "split": "train", "loss": 0.7}\n{"step": 2, "spl')
    with pytest.warns(UserWarning, match="truncated last line"):
        logger = MetricsLogger(str(tmp_path), LoggerConfig(tensorboard_enabled=False), enabled=True)
    logger.log(2, "train", {"loss": 0.6})
    logger.close()
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["loss"] for r in records] == [0.7, 0.6]


def test_corrupt_lines_anywhere_are_skipped_with_a_warning_and_never_block_a_resume(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(b'{"step": 1, "split": "train", "loss": 0.7}\n'
                     b'{"step": 2, "split": "tr\x00\x00\x00\n'  # zeroed block (crash on some file systems)
                     b'\xff\xfe not utf-8\n'
                     b'[1, 2]\n'
                     b'{"step": 3, "split": "train", "loss": 0.5}\n'
                     b'{"step": 4, "split": "train", "loss": 0.4}\n'
                     b'{"step": 5, "split": "tr')
    with pytest.warns(UserWarning) as caught:
        logger = MetricsLogger(str(tmp_path), LoggerConfig(tensorboard_enabled=False), enabled=True, resume_step=3)
    messages = [str(w.message) for w in caught]
    assert len(messages) == 4
    assert messages[0].startswith(f"{path}:2: skipping corrupt line (not a JSON line")
    assert messages[1].startswith(f"{path}:3: skipping corrupt line (not UTF-8 at byte 0)")
    assert messages[2].startswith(f"{path}:4: skipping corrupt line (expected an object with an integer 'step'")
    assert messages[3].startswith(f"{path}:7: skipping truncated last line")
    logger.log(4, "train", {"loss": 0.3})
    logger.close()
    assert [(r["step"], r["loss"]) for r in read_metrics(str(path))] == [(1, 0.7), (3, 0.5), (4, 0.3)]


def test_non_finite_values_are_written_as_null_and_bad_values_rejected(tmp_path):
    logger = MetricsLogger(str(tmp_path), LoggerConfig(tensorboard_enabled=False), enabled=True)
    logger.log(1, "train", {"loss": math.nan, "grad_norm": math.inf})
    with pytest.raises(ValueError, match="'lr' must be a number"):
        logger.log(1, "train", {"lr": "high"})
    with pytest.raises(ValueError, match="reserved"):
        logger.log(1, "train", {"step": 3.0})
    logger.close()
    assert json.loads((tmp_path / "metrics.jsonl").read_text()) == {
        "step": 1, "split": "train", "loss": None, "grad_norm": None}


def test_missing_wandb_names_the_extra_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)
    cfg = LoggerConfig(tensorboard_enabled=False, wandb_enabled=True)
    with pytest.raises(ImportError, match=r"megatron_dpo\[wandb\]"):
        MetricsLogger(str(tmp_path), cfg, enabled=True)


@requires_wandb
def test_wandb_offline_creates_a_run_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = LoggerConfig(tensorboard_enabled=False, wandb_enabled=True)
    _log_run(tmp_path, cfg, run_config={"loss_fn": {"reference_policy_kl_penalty": 0.1}})
    runs = [name for name in os.listdir(tmp_path / "wandb") if name.startswith("offline-run-")]
    assert len(runs) == 1
    assert any(name.endswith(".wandb") for name in os.listdir(tmp_path / "wandb" / runs[0]))


def test_step_line_is_compact_and_ordered():
    line = format_step_line(3, 40, TRAIN)
    assert line == ("step 3/40 | loss 0.6931 | pref 0.6931 | acc 0.00 | margin 0.0000 | "
                    "lr 1.0e-04 | grad 1.23 | 512 tok/s | 0.12 s")
    assert "sft 0.2500" in format_step_line(3, 40, {**TRAIN, "sft_loss": 0.25})


def test_val_line_names_split_and_step():
    line = format_val_line(10, VAL, split="val/heldout")
    assert line == "val/heldout @ step 10 | loss 0.6500 | acc 0.62 | margin 0.0800"


def test_progress_writes_one_line_per_step_and_nothing_when_disabled(capsys):
    progress = Progress(total=2, enabled=True, initial=1)
    progress.update(TRAIN)
    progress.close()
    assert "step 2/2 | loss 0.6931" in capsys.readouterr().out
    silent = Progress(total=2, enabled=False)
    silent.update(TRAIN)
    silent.write("hidden")
    silent.close()
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""


def test_val_samples_are_truncated_and_say_whether_ranked_right(capsys):
    samples = [
        {"prompt": "What is\n2+2?", "chosen": "4", "rejected": "five " * 40,
         "chosen_reward": 0.3, "rejected_reward": -0.1},
        {"prompt": "p", "chosen": "c", "rejected": "r", "chosen_reward": -1.0, "rejected_reward": 1.0},
        {"prompt": "never printed", "chosen": "c", "rejected": "r",
         "chosen_reward": 0.0, "rejected_reward": 0.0},
    ]
    print_val_samples(samples, n=2, width=20)
    out = capsys.readouterr().out
    assert "ranked right" in out and "ranked WRONG" in out
    assert "What is 2+2?" in out
    assert "five five five fi..." in out and "five " * 5 not in out
    assert "never printed" not in out


def test_summary_is_printed_aligned_and_written_atomically(tmp_path, capsys):
    summary = {"steps": 40, "final_val_accuracy": 0.8125, "loss": math.nan}
    print_summary(summary)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "run summary"
    assert len({line.index(value) for line, value in zip(lines[1:], ("40", "0.8125", "nan"))}) == 1
    path = write_summary(str(tmp_path), summary)
    assert path == str(tmp_path / "summary.json")
    assert json.loads((tmp_path / "summary.json").read_text()) == {**summary, "loss": None}
    assert os.listdir(tmp_path) == ["summary.json"]
