"""The DPO training loop: steps, validation, checkpoints, logging, summary.

The run directory is ``checkpointing.checkpoint_dir`` (default
``results/dpo``): it holds ``config.yaml``, ``metrics.jsonl``, ``metrics.png``,
``summary.json``, the ``step_N/`` checkpoints and ``logger.log_dir``.

A run whose run directory holds a checkpoint continues from it (see
train/resume.py). SIGTERM / SIGUSR1 or the ``checkpointing.checkpoint_must_save_by``
budget make every rank finish the step, save and return (see train/signals.py).
A step with a non-finite loss or gradient norm is skipped; too many in a row
abort (``dpo.max_consecutive_nonfinite``).
"""

import logging
import os
import shlex
import sys
import time
from typing import Dict, Optional

from megatron_dpo.checkpoint.fingerprint import tokenizer_fingerprint
from megatron_dpo.checkpoint.files import CONFIG_FILE, is_complete, step_dir
from megatron_dpo.checkpoint.hf_export import megatron_to_hf
from megatron_dpo.checkpoint.lora_export import export_adapter, export_merged
from megatron_dpo.checkpoint.errors import CheckpointSaveError
from megatron_dpo.checkpoint.dist import async_calls_queue
from megatron_dpo.checkpoint.save import (
    ModelFiles, PendingCheckpoint, complete_checkpoint, prune_checkpoints, start_checkpoint,
)
from megatron_dpo.config.load import config_to_dict, save_config
from megatron_dpo.config.schema import Config
from megatron_dpo.data import PairSampler
from megatron_dpo.logging import MetricsLogger, Progress, format_val_line, print_summary, print_val_samples, write_summary
from megatron_dpo.logging.files import json_safe
from megatron_dpo.train.errors import NonFiniteError
from megatron_dpo.train.resume import TrainState, checkpoint_state, lora_base, restore
from megatron_dpo.train.setup import Run, kernel_plan, setup_run
from megatron_dpo.train.signals import StopRequests
from megatron_dpo.train.step import train_step
from megatron_dpo.train.validation import validate

logger = logging.getLogger(__name__)


class Trainer:
    def __init__(self, run: Run, stop_requests: StopRequests):
        self.run = run
        self.cfg = run.cfg
        self.run_dir = run.cfg.checkpointing.checkpoint_dir
        self.is_rank0 = run.dims.is_rank0
        self.sampler = PairSampler(
            len(run.train_data.pairs), run.cfg.policy.train_global_batch_size, run.dims.dp_rank,
            run.dims.dp_size, run.cfg.data.shuffle, run.cfg.dpo.seed,
        )
        self.progress: Optional[Progress] = None
        self.fingerprints = {"tokenizer": tokenizer_fingerprint(run.tokenizer),
                             "data": run.train_data.fingerprint}
        self.state, resumed_from = restore(run, self.sampler, self.fingerprints) if run.resume_dir else (
            TrainState(), None)
        self.resumed = resumed_from is not None
        if self.resumed:
            self._write(f"resumed from {resumed_from} (step {self.step}, {self.sampler.consumed_pairs} pairs seen)")
        if self.is_rank0:
            save_config(run.cfg, os.path.join(self.run_dir, CONFIG_FILE))
        self.metrics_logger = MetricsLogger(
            self.run_dir, run.cfg.logger, self.is_rank0, config_to_dict(run.cfg),
            resume_step=self.step if self.resumed else None,
        )
        already_saved = self.resumed and is_complete(step_dir(self.run_dir, self.step))
        self.last_saved_step: Optional[int] = self.step if already_saved else None
        # "<split>:<metric>" -> value at the current step, for checkpoint retention.
        self.step_metrics: Dict[str, float] = {}
        self.stop_requests = stop_requests
        self.max_iteration_seconds = 0.0
        self.max_save_seconds = 0.0
        self.save_seconds = 0.0  # the pending save's time so far
        self.pending_save: Optional[PendingCheckpoint] = None
        self.async_queue = async_calls_queue() if run.cfg.checkpointing.async_save else None
        self.start_time = time.perf_counter()
        self.total_tokens = 0.0

    @property
    def step(self) -> int:
        return self.state.step

    # -- pieces --------------------------------------------------------------
    def _validate(self) -> None:
        num_samples = self.cfg.logger.num_val_samples_to_print
        for index, split in enumerate(self.run.val_data):
            metrics, samples = validate(self.run, split, num_samples)
            self._log(split, metrics)
            if index == 0:  # the first validation set gives the summary's numbers
                self.state.val_history.append(dict(metrics, step=self.step))
            if self.is_rank0:
                self._write(format_val_line(self.step, metrics, split))
                if samples and self.run.dims.dp_rank == 0:
                    print_val_samples(samples, num_samples)
        if self.is_rank0 and self.run.val_data:
            self._plot()

    def _log(self, split: str, metrics: Dict[str, float]) -> None:
        if split == "train":
            self.step_metrics = {}
        self.step_metrics.update({f"{split}:{name}": value for name, value in metrics.items()})
        self.metrics_logger.log(self.step, split, metrics)

    def _save(self) -> None:
        """Collective: checkpoint this step (checkpointing.async_save: start
        it, and complete the one before)."""
        pending = self.pending_save
        if not self.cfg.checkpointing.enabled or self.step in (self.last_saved_step, pending and pending.step):
            return
        if self.state.consecutive_nonfinite:  # never checkpoint a step whose loss or gradient norm was NaN/inf
            self._write(f"step {self.step} had a non-finite loss or gradient norm: not saved (the last saved "
                        f"step is {self.last_saved_step})")
            return
        self._complete_save()
        start = time.perf_counter()
        run = self.run
        state = checkpoint_state(run.dims, self.state, self.sampler, self.fingerprints, json_safe(self.step_metrics))
        state["lora_base"] = lora_base(run)
        # Only the distributed optimizer's state depends on the format; the
        # plain optimizer's is sharded like the model and reshards anyway.
        distributed = self.cfg.policy.megatron_cfg.optimizer.use_distributed_optimizer
        optimizer_format = self.cfg.checkpointing.optimizer_format if distributed else "fully_reshardable"
        self.pending_save = start_checkpoint(self.run_dir, self.step, run.policy, run.optimizer, run.scheduler, state,
                                             run.dims.rank, ModelFiles(run.cfg, run.arch, run.tokenizer),
                                             optimizer_format, self.async_queue)
        self.save_seconds = time.perf_counter() - start
        if self.async_queue is None or not self.max_save_seconds:
            # An async run waits for its first save in full: the time budget
            # (checkpoint_must_save_by) needs how long a whole save takes.
            self._complete_save(background=False)

    def _complete_save(self, background: bool = True) -> None:
        """Collective: make the pending checkpoint a complete step_N/."""
        pending, self.pending_save = self.pending_save, None
        if pending is None:
            return
        start = time.perf_counter()
        try:
            path = complete_checkpoint(pending)
        except CheckpointSaveError as error:
            newest = "no complete checkpoint yet" if self.last_saved_step is None else (
                f"the newest complete checkpoint is step_{self.last_saved_step}")
            raise CheckpointSaveError(f"{error}. Nothing complete was touched: {newest}. Free space (or fix the "
                                      "file system) and run the same command again to continue.") from error
        if self.is_rank0:
            prune_checkpoints(self.cfg.checkpointing)
        self.last_saved_step = pending.step
        seconds = self.save_seconds + time.perf_counter() - start
        self.max_save_seconds = max(self.max_save_seconds, seconds)
        self._write(f"saved checkpoint {path} (written in the background; training waited {seconds:.1f} s)"
                    if background else f"saved checkpoint {path} in {seconds:.1f} s")

    def _count_skipped(self, metrics: Dict[str, float]) -> None:
        state = self.state
        if metrics.pop("update_skipped"):
            state.skipped_steps += 1
            state.consecutive_nonfinite += 1
            self._write(f"step {self.step}: loss {metrics['loss']}, grad norm {metrics['grad_norm']}: update skipped")
        else:
            state.consecutive_nonfinite = 0
        metrics["skipped_steps"] = state.skipped_steps

    def _abort_if_diverged(self) -> None:
        limit = self.cfg.dpo.max_consecutive_nonfinite
        if self.state.consecutive_nonfinite >= limit:
            raise NonFiniteError(
                f"{limit} consecutive steps (up to step {self.step}) had a non-finite loss or gradient norm "
                f"(dpo.max_consecutive_nonfinite={limit}); the run diverged. {self._resume_hint()} Lower "
                "policy.megatron_cfg.optimizer.lr, set policy.precision=float32, or check the data."
            )

    def _resume_hint(self) -> str:
        """Where the last good state is, and the command that continues from it."""
        if self.last_saved_step is None:
            return "No checkpoint of this run was saved: start it again."
        last_good = os.path.abspath(step_dir(self.run_dir, self.last_saved_step))
        nproc = os.environ.get("LOCAL_WORLD_SIZE", "1")
        command = " ".join(shlex.quote(arg) for arg in sys.argv)
        return (f"The last good checkpoint is step {self.last_saved_step} ({last_good}); continue from it with: "
                f"torchrun --nproc_per_node={nproc} {command} checkpointing.resume={shlex.quote(last_good)}")

    def _stop_reason(self, iteration_start: float) -> Optional[str]:
        """Collective: whether every rank stops now (signal or time budget)."""
        self.max_iteration_seconds = max(self.max_iteration_seconds, time.perf_counter() - iteration_start)
        return self.stop_requests.agreed_reason(self.max_iteration_seconds + self.max_save_seconds)

    def _write(self, line: str) -> None:
        if not self.is_rank0:
            return
        if self.progress is not None:
            self.progress.write(line)
        else:
            print(line, flush=True)

    def _plot(self) -> None:
        if not self.cfg.logger.plot_enabled:
            return
        from megatron_dpo.logging.plots import plot_metrics

        try:
            plot_metrics(self.run_dir)
        except ValueError as error:  # e.g. no train records yet at val_at_start
            logger.debug("plot skipped: %s", error)

    def _periodic(self, period: int) -> bool:
        return period > 0 and self.step % period == 0

    # -- the loop ------------------------------------------------------------
    def fit(self) -> Dict[str, object]:
        run, dpo = self.run, self.cfg.dpo
        self._announce()
        if dpo.val_at_start and not self.resumed:
            self._validate()
        self.progress = Progress(run.total_steps, self.is_rank0, initial=self.step)
        stop_reason = None
        while self.step < run.total_steps and stop_reason is None:
            for indices in self.sampler:
                iteration_start = time.perf_counter()
                metrics = train_step(run, [run.train_data.pairs[i] for i in indices])
                self.state.step += 1
                self.total_tokens += metrics["num_tokens"]
                self._count_skipped(metrics)
                self._log("train", metrics)
                self.progress.update(metrics)
                self._abort_if_diverged()
                if self._periodic(dpo.val_period):
                    self._validate()
                if self._periodic(self.cfg.checkpointing.save_period):
                    self._save()
                stop_reason = self._stop_reason(iteration_start)
                if self.step >= run.total_steps or stop_reason is not None:
                    break
        self.progress.close()
        self.progress = None  # a closed bar prints nothing: later lines go to stdout
        if stop_reason is not None:
            self._write(f"stopping after step {self.step} of {run.total_steps}: {stop_reason}")
        elif dpo.val_at_end and not self._periodic(dpo.val_period):
            self._validate()
        self._save()
        self._complete_save()
        hf_export = self._export_hf() if stop_reason is None else None
        return self._finish(stop_reason, hf_export)

    def _announce(self) -> None:
        run = self.run
        train = run.train_data
        self._write(
            f"megatron_dpo: {run.dims.describe()}; {len(train.pairs)} train pairs, {run.total_steps} steps "
            f"of {self.cfg.policy.train_global_batch_size} pairs"
        )
        self._write(f"kernels: {kernel_plan(self.cfg).describe(moe=run.arch.is_moe)}")
        for name, data in {"train": train, **run.val_data}.items():
            if data.num_dropped or data.num_truncated:
                self._write(
                    f"{name} data: {data.num_dropped} pairs dropped and {data.num_truncated} truncated to "
                    f"policy.max_total_sequence_length={self.cfg.policy.max_total_sequence_length} "
                    f"(data.overlength_policy={self.cfg.data.overlength_policy}, "
                    f"data.truncation_mode={self.cfg.data.truncation_mode})"
                )

    def _export_hf(self) -> Optional[str]:
        """Collective: the final checkpoint as an HF model directory (checkpointing.export_hf_dir;
        LoRA: base and adapters merged) and, for LoRA, as a PEFT adapter directory
        (checkpointing.export_adapter_dir)."""
        final = step_dir(self.run_dir, self.last_saved_step)
        adapter_dir = self.cfg.checkpointing.export_adapter_dir
        if adapter_dir is not None:
            self._write(f"exported the adapters as a PEFT adapter: {os.path.abspath(export_adapter(final, adapter_dir))}")
        out_dir = self.cfg.checkpointing.export_hf_dir
        if out_dir is None:
            return None
        export = export_merged if self.cfg.policy.lora_cfg.enabled else megatron_to_hf
        path = os.path.abspath(export(final, out_dir))
        self._write(f"exported the policy as a Hugging Face model: {path}")
        return path

    def _finish(self, stop_reason: Optional[str], hf_export: Optional[str]) -> Dict[str, object]:
        self.stop_requests.close()
        wall = time.perf_counter() - self.start_time
        summary = {
            "steps": self.step,
            "pairs_seen": self.sampler.consumed_pairs,
            "wall_time_s": round(wall, 2),
            "tokens_per_sec": round(self.total_tokens / wall, 1) if wall > 0 else 0.0,
            "run_dir": os.path.abspath(self.run_dir),
            "checkpoint": os.path.abspath(os.path.join(self.run_dir, f"step_{self.last_saved_step}"))
            if self.last_saved_step is not None else None,
            "stopped_early": stop_reason,
            "hf_export": hf_export,
            # What a stop decision needs (slurm/job_state.py budgets the next attempt with them).
            "max_step_time_s": round(self.max_iteration_seconds, 3),
            "max_save_time_s": round(self.max_save_seconds, 3),
        }
        val_history = self.state.val_history
        if val_history:
            final, best = val_history[-1], max(val_history, key=lambda m: m["accuracy"])
            summary.update(
                final_val_accuracy=final["accuracy"], final_val_loss=final["loss"],
                best_val_accuracy=best["accuracy"], best_val_step=best["step"],
                best_val_loss=min(m["loss"] for m in val_history),
            )
        self.metrics_logger.close()
        if self.is_rank0:
            self._plot()
            write_summary(self.run_dir, summary)
            print_summary(summary)
        return summary


def train(cfg: Config) -> Dict[str, object]:
    # Listen for stop signals before the (long) setup: a preemption notice that
    # arrives while models load is honoured after the first step, not lost.
    stop_requests = StopRequests(cfg.checkpointing.checkpoint_must_save_by)
    run = setup_run(cfg)
    try:
        return Trainer(run, stop_requests).fit()
    finally:
        if run.lock is not None:
            run.lock.release()
