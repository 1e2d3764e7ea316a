"""Rank-0 console output: per-step lines under a progress bar, validation
lines, sample completions, and the end-of-run summary.

All text goes through ``tqdm.write`` so that it lands above an active
progress bar instead of breaking it; without a bar it is a plain print.
"""

import json
import logging
import os
import time
from contextlib import contextmanager
from typing import Dict, Iterator, List, Optional

from tqdm import tqdm

from megatron_dpo.logging.files import atomic_path, json_safe

# (metric name, label, format): the order and spelling of step and val lines.
_LOSS_FIELDS = (
    ("loss", "loss", "{:.4f}"),
    ("preference_loss", "pref", "{:.4f}"),
    ("sft_loss", "sft", "{:.4f}"),
    ("accuracy", "acc", "{:.2f}"),
    ("reward_margin", "margin", "{:.4f}"),
)
_STEP_FIELDS = _LOSS_FIELDS + (("lr", "lr", "{:.1e}"), ("grad_norm", "grad", "{:.3g}"))
_VAL_FIELDS = _LOSS_FIELDS + (
    ("chosen_reward", "chosen", "{:.4f}"),
    ("rejected_reward", "rejected", "{:.4f}"),
)


def _format_fields(metrics: Dict[str, float], fields) -> List[str]:
    """Format the known metrics present; an SFT loss of 0 (weight 0) is noise."""
    parts = []
    for name, label, fmt in fields:
        if name not in metrics or (name == "sft_loss" and metrics[name] == 0):
            continue
        parts.append(f"{label} {fmt.format(metrics[name])}")
    return parts


def format_step_line(step: int, total_steps: int, metrics: Dict[str, float]) -> str:
    """``step 3/40 | loss 0.6931 | pref 0.6931 | acc 0.00 | ... | 512 tok/s | 0.12 s``."""
    parts = [f"step {step}/{total_steps}", *_format_fields(metrics, _STEP_FIELDS)]
    if "tokens_per_sec" in metrics:
        parts.append(f"{metrics['tokens_per_sec']:.0f} tok/s")
    if "step_time" in metrics:
        parts.append(f"{metrics['step_time']:.2f} s")
    return " | ".join(parts)


def format_val_line(step: int, metrics: Dict[str, float], split: str = "val") -> str:
    """``val @ step 10 | loss 0.6512 | pref 0.6512 | acc 0.62 | margin 0.0841 | ...``."""
    return " | ".join([f"{split} @ step {step}", *_format_fields(metrics, _VAL_FIELDS)])


class Progress:
    """A tqdm bar over optimizer steps with one metrics line per step above it.

    ``initial`` is the step a resumed run starts from, so the bar and the
    printed step numbers continue rather than restart at 0.
    """

    def __init__(self, total: int, enabled: bool, initial: int = 0):
        self.total = total
        self._bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True) if enabled else None

    def update(self, metrics: Dict[str, float]) -> None:
        """Advance one step and print its metrics line above the bar."""
        if self._bar is None:
            return
        self._bar.update(1)
        tqdm.write(format_step_line(self._bar.n, self.total, metrics))

    def write(self, line: str) -> None:
        """Print a line (e.g. a validation line) without breaking the bar."""
        if self._bar is not None:
            tqdm.write(line)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def _one_line(text: str, width: int) -> str:
    """Collapse whitespace and cut to ``width`` characters, marking the cut."""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= width else flat[: max(width - 3, 0)] + "..."


def print_val_samples(samples: List[dict], n: int, width: int = 100) -> None:
    """Print the first ``n`` validation pairs with their rewards.

    Reading a few completions with their rewards catches what the averages
    hide (a template bug, a prompt cut to nothing, a reward sign flipped).
    Each sample has prompt, chosen, rejected, chosen_reward, rejected_reward.
    """
    for index, sample in enumerate(samples[: max(n, 0)]):
        chosen_reward, rejected_reward = sample["chosen_reward"], sample["rejected_reward"]
        verdict = "ranked right" if chosen_reward > rejected_reward else "ranked WRONG"
        tqdm.write(
            f"[val sample {index + 1}] {verdict} "
            f"(chosen reward {chosen_reward:.4f}, rejected reward {rejected_reward:.4f})"
        )
        for key in ("prompt", "chosen", "rejected"):
            tqdm.write(f"  {key + ':':<10}{_one_line(sample[key], width)}")


def _format_value(value) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def print_summary(summary: Dict[str, object], title: Optional[str] = "run summary") -> None:
    """Print ``summary`` as a two-column table, keys left-aligned."""
    if not summary:
        return
    key_width = max(len(str(key)) for key in summary)
    lines = [title] if title else []
    lines += [f"  {str(key):<{key_width}}  {_format_value(value)}" for key, value in summary.items()]
    tqdm.write("\n".join(lines))


def write_summary(run_dir: str, summary: Dict[str, object]) -> str:
    """Write ``run_dir/summary.json`` atomically; return its path.

    Atomic (temporary name, then rename) so a reader never sees half a file.
    """
    os.makedirs(run_dir, exist_ok=True)
    path = os.path.join(run_dir, "summary.json")
    with atomic_path(path) as tmp_path, open(tmp_path, "w", encoding="utf-8") as f:
        json.dump(json_safe(summary), f, indent=2)
        f.write("\n")
    return path


@contextmanager
def timed(what: str) -> Iterator[None]:
    """Log ``what`` and, when it is done, how long it took (INFO: rank 0 only,
    as the CLI configures logging). For the long phases outside the step loop:
    tokenisation, model build and weight loading, reference pre-pass, saves."""
    log = logging.getLogger("megatron_dpo")
    log.info("%s ...", what)
    start = time.perf_counter()
    yield
    log.info("%s: done in %.1f s", what, time.perf_counter() - start)
