"""Metrics sinks (metrics.jsonl, TensorBoard, W&B), console output, plots.

``plots`` is not imported here: it pulls in matplotlib, which a training
process only needs at the end of a run.
"""

from megatron_dpo.logging.console import (
    Progress,
    format_step_line,
    format_val_line,
    print_summary,
    print_val_samples,
    timed,
    write_summary,
)
from megatron_dpo.logging.metrics import MetricsLogger, read_metrics

__all__ = [
    "MetricsLogger",
    "Progress",
    "format_step_line",
    "format_val_line",
    "print_summary",
    "print_val_samples",
    "read_metrics",
    "timed",
    "write_summary",
]
