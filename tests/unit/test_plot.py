"""plot_metrics: one PNG from metrics.jsonl, clear errors on bad input."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_dpo.config.schema import LoggerConfig
from megatron_dpo.logging.metrics import MetricsLogger
from megatron_dpo.logging.plots import PANELS, ema, plot_metrics

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "plot_metrics.py"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _train_metrics(step):
    loss = math.log(2) * math.exp(-step / 30)
    return {"loss": loss, "preference_loss": loss, "sft_loss": 0.0,
            "chosen_reward": 0.01 * step, "rejected_reward": -0.01 * step,
            "reward_margin": 0.02 * step, "accuracy": min(1.0, 0.5 + step / 100),
            "chosen_logps": -50.0, "rejected_logps": -55.0 - step / 10,
            "grad_norm": 1.0 + (step % 7) / 10, "lr": 1e-5 * min(1.0, step / 5),
            "tokens_per_sec": 500.0 + step % 5, "step_time": 0.1}


def _write_run(run_dir, num_steps=40, val_period=10):
    """A synthetic run logged through the real MetricsLogger."""
    logger = MetricsLogger(str(run_dir), LoggerConfig(tensorboard_enabled=False), enabled=True)
    for step in range(0, num_steps + 1):
        if step > 0:
            logger.log(step, "train", _train_metrics(step))
        if step % val_period == 0:
            val = {k: v for k, v in _train_metrics(max(step, 1)).items() if k not in ("lr", "grad_norm")}
            logger.log(step, "val", val)
            logger.log(step, "val/heldout", {**val, "accuracy": val["accuracy"] - 0.1})
    logger.close()


def test_render_writes_a_png_with_every_panel(tmp_path):
    _write_run(tmp_path)
    out_path, titles = plot_metrics(str(tmp_path))
    assert out_path == str(tmp_path / "metrics.png")
    data = Path(out_path).read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 50_000
    assert titles == [panel.title for panel in PANELS]
    for expected in ("Loss", "Rewards: chosen vs rejected", "Reward margin", "Accuracy",
                     "SFT loss (NLL of chosen)", "Grad norm (before clipping)", "Learning rate", "Throughput"):
        assert expected in titles
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl", "metrics.png"]


def test_script_writes_to_out_and_reports_bad_input(tmp_path):
    _write_run(tmp_path / "run")
    out = tmp_path / "plots" / "curves.png"
    done = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "run"), "--out", str(out)],
                          capture_output=True, text=True, check=True)
    assert done.stdout.strip() == str(out)
    assert out.read_bytes().startswith(PNG_MAGIC)
    failed = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "nowhere")],
                            capture_output=True, text=True)
    assert failed.returncode == 2 and "metrics file not found" in failed.stderr


def test_missing_file_is_a_value_error_naming_it(tmp_path):
    with pytest.raises(ValueError, match=r"metrics\.jsonl: metrics file not found"):
        plot_metrics(str(tmp_path))


def test_empty_file_is_a_value_error_naming_it(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("")
    with pytest.raises(ValueError, match=r"metrics\.jsonl: metrics file is empty"):
        plot_metrics(str(tmp_path))


def test_corrupt_middle_line_is_an_error_naming_the_line(tmp_path):
    _write_run(tmp_path, num_steps=3)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines(keepends=True)
    lines[1] = lines[1][:15] + "\n"
    (tmp_path / "metrics.jsonl").write_text("".join(lines))
    with pytest.raises(ValueError, match=r"metrics\.jsonl:2: not a JSON line"):
        plot_metrics(str(tmp_path))


def test_truncated_last_line_is_skipped_with_a_warning(tmp_path):
    _write_run(tmp_path, num_steps=3)
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "split": "train", "lo')
    with pytest.warns(UserWarning, match=r"metrics\.jsonl:\d+: skipping truncated last line"):
        out_path, _ = plot_metrics(str(tmp_path), str(tmp_path / "out.png"))
    assert Path(out_path).stat().st_size > 10_000


def test_no_train_records_is_an_error(tmp_path):
    records = [{"step": 0, "split": "val", "loss": 0.69}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    with pytest.raises(ValueError, match=r"metrics\.jsonl: no train records \(splits found: \['val'\]\)"):
        plot_metrics(str(tmp_path))


def test_ema_is_bias_corrected():
    assert ema([2.0, 2.0, 2.0], weight=0.9) == pytest.approx([2.0, 2.0, 2.0])
    assert ema([1.0, 3.0], weight=0.0) == [1.0, 3.0]
    # (0.5 * 0.5 * 1 + 0.5 * 3) / (1 - 0.25) = 1.75 / 0.75
    assert ema([1.0, 3.0], weight=0.5)[1] == pytest.approx(1.75 / 0.75)
