"""One PNG of a run's curves, drawn from ``RUN_DIR/metrics.jsonl``.

Train curves are noisy per step, so they are drawn as an EMA with the raw
points faint behind; validation points are few, so they get markers. Every
validation split (``val``, ``val/<name>``) is drawn next to train on the
panels that have it. Uses matplotlib's ``Figure`` directly (Agg canvas), never
pyplot: no display, no global figure state in a training process.
"""

import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from matplotlib.figure import Figure

from megatron_dpo.logging.files import atomic_path
from megatron_dpo.logging.metrics import METRICS_FILE, read_metrics

_VAL_MARKERS = ("o", "s", "^", "D", "v", "P")


@dataclass(frozen=True)
class Panel:
    title: str
    metrics: Tuple[str, ...]
    ylabel: str
    smooth: bool = True


PANELS = (
    Panel("Loss", ("loss", "preference_loss"), "loss (nats)"),
    # Its own axis: a summed NLL is ~100x the preference loss and would flatten it.
    Panel("SFT loss (NLL of chosen)", ("sft_loss",), "loss (nats)"),
    Panel("Rewards: chosen vs rejected", ("chosen_reward", "rejected_reward"), "reward (nats)"),
    Panel("Reward margin", ("reward_margin",), "chosen - rejected reward (nats)"),
    Panel("Accuracy", ("accuracy",), "pairs fraction"),
    Panel("Grad norm (before clipping)", ("grad_norm",), "L2 norm"),
    # The schedule is exact; smoothing would only blur warmup.
    Panel("Learning rate", ("lr",), "learning rate", smooth=False),
    Panel("Throughput", ("tokens_per_sec",), "tokens/s"),
)


def plot_metrics(run_dir: str, out_path: Optional[str] = None) -> Tuple[str, List[str]]:
    """Render ``run_dir/metrics.jsonl`` to a PNG; return (path, panel titles).

    ``out_path`` defaults to ``run_dir/metrics.png``. Raises ValueError naming
    the metrics file when it is missing, empty, corrupt or has no train records.
    """
    metrics_path = os.path.join(run_dir, METRICS_FILE)
    by_split = _group_by_split(read_metrics(metrics_path))
    if "train" not in by_split:
        raise ValueError(f"{metrics_path}: no train records (splits found: {sorted(by_split)})")
    out_path = out_path or os.path.join(run_dir, "metrics.png")
    fig = Figure(figsize=(13, 15), layout="constrained")
    fig.suptitle(f"{os.path.basename(os.path.abspath(run_dir))}: {metrics_path}")
    axes = fig.subplots(4, 2).flatten()
    for ax, panel in zip(axes, PANELS):
        _draw_panel(ax, panel, by_split)
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    with atomic_path(out_path) as tmp_path:
        fig.savefig(tmp_path, format="png", dpi=90)
    return out_path, [ax.get_title() for ax in axes]


def _group_by_split(records: List[dict]) -> Dict[str, List[dict]]:
    by_split: Dict[str, List[dict]] = {}
    for record in records:
        by_split.setdefault(record["split"], []).append(record)
    return by_split


def _series(records: List[dict], name: str) -> Tuple[List[int], List[float]]:
    """Steps and values of ``name``, sorted by step; null (non-finite) skipped.

    A step logged twice (a resumed run that re-logged it) keeps the later value.
    """
    by_step = {r["step"]: r[name] for r in records if r.get(name) is not None}
    steps = sorted(by_step)
    return steps, [float(by_step[step]) for step in steps]


def ema(values: Sequence[float], weight: float) -> List[float]:
    """Bias-corrected exponential moving average (as TensorBoard's smoothing).

    The correction keeps the first points from being dragged towards 0.
    """
    smoothed, average = [], 0.0
    for count, value in enumerate(values, start=1):
        average = weight * average + (1 - weight) * value
        smoothed.append(average / (1 - weight**count))
    return smoothed


def _smoothing_weight(num_points: int) -> float:
    """More smoothing for long runs; little for short ones, where it would lag."""
    return min(0.9, max(0.0, 1 - 10 / max(num_points, 1)))


def _draw_panel(ax, panel: Panel, by_split: Dict[str, List[dict]]) -> None:
    ax.set_title(panel.title)
    ax.set_xlabel("step")
    ax.set_ylabel(panel.ylabel)
    eval_splits = sorted(split for split in by_split if split != "train")
    drawn = False
    for index, name in enumerate(panel.metrics):
        color = f"C{index}"
        drawn |= _draw_train(ax, name, by_split["train"], color, panel.smooth)
        for split_index, split in enumerate(eval_splits):
            marker = _VAL_MARKERS[split_index % len(_VAL_MARKERS)]
            steps, values = _series(by_split[split], name)
            if steps:
                ax.plot(steps, values, marker=marker, linestyle="--", color=color,
                        linewidth=1.2, markersize=5, label=f"{split} {name}")
                drawn = True
    if "accuracy" in panel.metrics:
        ax.axhline(0.5, color="grey", linestyle=":", linewidth=1, label="chance")
        ax.set_ylim(-0.02, 1.02)
    if drawn:
        ax.legend(fontsize="small")
        ax.grid(alpha=0.3)
    else:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)


def _draw_train(ax, name: str, records: List[dict], color: str, smooth: bool) -> bool:
    """Draw the train curve of ``name``; return whether there was any data."""
    steps, values = _series(records, name)
    if not steps:
        return False
    if not smooth:
        ax.plot(steps, values, color=color, linewidth=1.5, label=f"train {name}")
        return True
    ax.plot(steps, values, color=color, linewidth=0.8, alpha=0.25)
    weight = _smoothing_weight(len(values))
    ax.plot(steps, ema(values, weight), color=color, linewidth=1.8,
            label=f"train {name} (EMA {weight:.2f})")
    return True
