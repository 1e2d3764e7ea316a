"""Stop cleanly when asked: finish the step, save, exit 0.

Two things ask: SIGTERM or SIGUSR1 (Slurm's ``--signal``, a scheduler's
preemption notice), and ``checkpointing.checkpoint_must_save_by``, a
wall-clock budget counted from process start. A signal may reach only some
ranks, and ranks read their clocks at different moments, so after every step
the ranks all-reduce their stop requests: all stop after the same step.
"""

import signal
import time
from typing import Optional

import psutil
import torch
import torch.distributed as dist

from megatron_dpo.config.load import duration_seconds
from megatron_dpo.parallel.init import get_device

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
# Reasons by priority: the all-reduce keeps the largest code.
_REASONS = (None, "checkpointing.checkpoint_must_save_by", "signal")


class StopRequests:
    """Installs the signal handlers; ``agreed_reason`` is collective (call it on every rank)."""

    def __init__(self, must_save_by: Optional[str]):
        self.signal_name: Optional[str] = None
        self.deadline = None
        if must_save_by is not None:
            self.deadline = psutil.Process().create_time() + duration_seconds(must_save_by)
        self._previous = {sig: signal.signal(sig, self._on_signal) for sig in STOP_SIGNALS}

    def _on_signal(self, signum, frame) -> None:
        self.signal_name = signal.Signals(signum).name

    def agreed_reason(self, seconds_needed: float) -> Optional[str]:
        """Why every rank stops after this step (None: go on). ``seconds_needed``:
        this rank's estimate of one more step plus a save, kept within the budget."""
        code = 0
        if self.deadline is not None and time.time() + seconds_needed >= self.deadline:
            code = 1
        if self.signal_name is not None:
            code = 2
        flag = torch.tensor([code], dtype=torch.int32, device=get_device())
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        reason = _REASONS[int(flag.item())]
        return f"{reason} ({self.signal_name})" if reason == "signal" and self.signal_name else reason

    def close(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
