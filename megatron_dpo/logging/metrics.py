"""One metrics path feeding every sink: metrics.jsonl, TensorBoard, W&B.

Every sink receives the same ``(step, split, name -> value)`` triples, so a
curve in TensorBoard, a point in W&B and a line of ``metrics.jsonl`` always
agree. Splits are ``"train"``, ``"val"`` and ``"val/<name>"``; TensorBoard and
W&B tags are ``f"{split}/{name}"`` (``train/loss``, ``val/accuracy``).

The caller decides who logs (``enabled`` is True on one rank only); nothing
here touches ``torch.distributed``.

``metrics.jsonl``: one JSON object per line, ``{"step", "split", **metrics}``,
flushed per line so a killed run loses at most the line being written.
Non-finite values are written as ``null`` (strict JSON).
"""

import json
import os
import warnings
from typing import Dict, List, Optional

from megatron_dpo.config.schema import LoggerConfig
from megatron_dpo.logging.files import atomic_path, json_safe

METRICS_FILE = "metrics.jsonl"
_MAX_LINE_WARNINGS = 10


class MetricsLogger:
    """Writes each ``log`` call to metrics.jsonl, TensorBoard and W&B.

    ``resume_step``: when a run resumes from checkpoint ``step_N``, records
    past N (in metrics.jsonl and TensorBoard) were written after that
    checkpoint and will be written again; they are dropped so each reads as
    one run. W&B starts a new run.
    """

    def __init__(
        self,
        run_dir: str,
        cfg: LoggerConfig,
        enabled: bool,
        run_config: Optional[dict] = None,
        *,
        resume_step: Optional[int] = None,
    ):
        self.enabled = enabled
        self._jsonl = None
        self._tensorboard = None
        self._wandb_run = None
        if not enabled:
            return
        os.makedirs(run_dir, exist_ok=True)
        path = os.path.join(run_dir, METRICS_FILE)
        _repair_for_append(path, resume_step)
        self._jsonl = open(path, "a", encoding="utf-8")
        if cfg.tensorboard_enabled:
            self._tensorboard = _open_tensorboard(_resolve(run_dir, cfg.log_dir), resume_step)
        if cfg.wandb_enabled:
            self._wandb_run = _open_wandb(run_dir, cfg, run_config)

    def log(self, step: int, split: str, metrics: Dict[str, float]) -> None:
        """Record ``metrics`` of ``split`` at optimizer step ``step`` everywhere."""
        if not self.enabled:
            return
        values = _as_floats(metrics)
        record = {"step": int(step), "split": split, **json_safe(values)}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        tags = {f"{split}/{name}": value for name, value in values.items()}
        if self._tensorboard is not None:
            for tag, value in tags.items():
                self._tensorboard.add_scalar(tag, value, global_step=step)
            self._tensorboard.flush()
        if self._wandb_run is not None:
            self._wandb_run.log(tags, step=step)

    def close(self) -> None:
        """Flush and close every sink; safe to call twice."""
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None
        if self._wandb_run is not None:
            self._wandb_run.finish()
            self._wandb_run = None


def read_metrics(path: str) -> List[dict]:
    """Read a metrics.jsonl into a list of records, in file order.

    A run killed mid-write leaves a partial last line: it is skipped with a
    warning. Any other unparseable line is a ValueError naming file and line
    (a resume, by contrast, skips it: see ``_repair_for_append``).
    """
    if not os.path.isfile(path):
        raise ValueError(f"{path}: metrics file not found (is this a run directory?)")
    records = _parse_jsonl(path, skip_corrupt=False)
    if not records:
        raise ValueError(f"{path}: metrics file is empty (no step was logged yet)")
    return records


def _parse_line(raw: bytes):
    """(record, None) for a valid line, else (None, what is wrong)."""
    try:
        record = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        return None, f"not UTF-8 at byte {e.start}"
    except json.JSONDecodeError as e:
        return None, f"not a JSON line ({e})"
    if not isinstance(record, dict) or type(record.get("step")) is not int or not isinstance(record.get("split"), str):
        return None, "expected an object with an integer 'step' and a string 'split'"
    return record, None


def _parse_jsonl(path: str, skip_corrupt: bool) -> List[dict]:
    """The file's records. A bad last line (a killed write) is always skipped
    with a warning; a bad line elsewhere too when ``skip_corrupt``, else it
    is a ValueError. Warnings and errors name file and line."""
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")
    last = max((i for i, raw in enumerate(lines) if raw.strip()), default=-1)
    records, skipped = [], []
    for index, raw in enumerate(lines):
        if not raw.strip():
            continue
        record, problem = _parse_line(raw)
        if problem is None:
            records.append(record)
        elif index == last:
            skipped.append(f"{path}:{index + 1}: skipping truncated last line ({problem})")
        elif skip_corrupt:
            skipped.append(f"{path}:{index + 1}: skipping corrupt line ({problem}): {raw[:80]!r}")
        else:
            raise ValueError(f"{path}:{index + 1}: {problem}: {raw[:80]!r}")
    for message in skipped[:_MAX_LINE_WARNINGS]:
        warnings.warn(message)
    if len(skipped) > _MAX_LINE_WARNINGS:
        warnings.warn(f"{path}: skipped {len(skipped) - _MAX_LINE_WARNINGS} more corrupt lines")
    return records


def _repair_for_append(path: str, resume_step: Optional[int]) -> None:
    """Rewrite an existing metrics.jsonl so that appending to it is safe.

    Appending after a partial last line would glue two records into one
    corrupt middle line; records past ``resume_step`` would be duplicated.
    Rewriting the parsed records drops both, and any corrupt line (warned
    about once, then gone); the file is small: one line a step.
    """
    if not os.path.exists(path):
        return
    records = _parse_jsonl(path, skip_corrupt=True)
    kept = [r for r in records if resume_step is None or r["step"] <= resume_step]
    with atomic_path(path) as tmp_path, open(tmp_path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in kept)


def _as_floats(metrics: Dict[str, float]) -> Dict[str, float]:
    """Coerce values (python, numpy or 0-d torch numbers) to float."""
    values = {}
    for name, value in metrics.items():
        if name in ("step", "split"):
            raise ValueError(f"metric name {name!r} is reserved for the record itself")
        try:
            values[name] = float(value)
        except (TypeError, ValueError) as e:
            raise ValueError(f"metric {name!r} must be a number, got {value!r}") from e
    return values


def _resolve(run_dir: str, log_dir: str) -> str:
    return log_dir if os.path.isabs(log_dir) else os.path.join(run_dir, log_dir)


def _open_tensorboard(log_dir: str, resume_step: Optional[int]):
    """``purge_step`` makes TensorBoard hide the old run's events past the
    checkpoint, as ``_repair_for_append`` does for metrics.jsonl."""
    from torch.utils.tensorboard import SummaryWriter

    purge_step = None if resume_step is None else resume_step + 1
    return SummaryWriter(log_dir=log_dir, purge_step=purge_step)


def _open_wandb(run_dir: str, cfg: LoggerConfig, run_config: Optional[dict]):
    """Start a W&B run; WANDB_MODE=offline (read by wandb) keeps it local."""
    try:
        import wandb
    except ImportError as e:
        raise ImportError(
            "logger.wandb_enabled=true needs the wandb package: "
            "pip install 'megatron_dpo[wandb]' (or set logger.wandb_enabled=false)"
        ) from e
    return wandb.init(
        project=cfg.wandb.project, name=cfg.wandb.name, dir=run_dir, config=run_config
    )
