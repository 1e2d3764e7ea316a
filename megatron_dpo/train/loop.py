"""The DPO training loop: steps, validation, checkpoints, logging, summary.

The run directory is ``checkpointing.checkpoint_dir`` (default
``results/dpo``): it holds ``config.yaml``, ``metrics.jsonl``, ``metrics.png``,
``summary.json``, the ``step_N/`` checkpoints and ``logger.log_dir``.
"""

import logging
import os
import time
from typing import Dict, Optional

from megatron_dpo.checkpoint.save import prune_checkpoints, save_checkpoint
from megatron_dpo.config.load import config_to_dict, save_config
from megatron_dpo.config.schema import Config
from megatron_dpo.data import PairSampler
from megatron_dpo.logging import MetricsLogger, Progress, format_val_line, print_summary, print_val_samples, write_summary
from megatron_dpo.train.setup import Run, setup_run
from megatron_dpo.train.step import train_step
from megatron_dpo.train.validation import validate

logger = logging.getLogger(__name__)


class Trainer:
    def __init__(self, run: Run):
        self.run = run
        self.cfg = run.cfg
        self.run_dir = run.cfg.checkpointing.checkpoint_dir
        self.is_rank0 = run.ctx.is_rank0
        self.step = 0
        self.sampler = PairSampler(
            len(run.train_data.pairs), run.cfg.policy.train_global_batch_size, run.ctx.dp_rank,
            run.ctx.dp_size, run.cfg.data.shuffle, run.cfg.dpo.seed,
        )
        self.metrics_logger = MetricsLogger(self.run_dir, run.cfg.logger, self.is_rank0, config_to_dict(run.cfg))
        self.progress: Optional[Progress] = None
        self.val_history = []
        self.last_saved_step: Optional[int] = None
        self.start_time = time.perf_counter()
        self.total_tokens = 0.0

    # -- pieces --------------------------------------------------------------
    def _validate(self) -> None:
        if self.run.val_data is None:
            return
        num_samples = self.cfg.logger.num_val_samples_to_print
        metrics, samples = validate(self.run, num_samples)
        self.metrics_logger.log(self.step, "val", metrics)
        self.val_history.append(dict(metrics, step=self.step))
        if self.is_rank0:
            self._write(format_val_line(self.step, metrics))
            if samples and self.run.ctx.dp_rank == 0:
                print_val_samples(samples, num_samples)
            self._plot()

    def _save(self) -> None:
        if not self.cfg.checkpointing.enabled or self.last_saved_step == self.step:
            return
        state = {"step": self.step, "epoch": self.sampler.epoch, "consumed_pairs": self.sampler.consumed_pairs}
        path = save_checkpoint(self.run, self.step, state)
        prune_checkpoints(self.run, self.cfg.checkpointing.keep_top_k)
        self.last_saved_step = self.step
        self._write(f"saved checkpoint {path}")

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
        if dpo.val_at_start:
            self._validate()
        self.progress = Progress(run.total_steps, self.is_rank0, initial=self.step)
        while self.step < run.total_steps:
            for indices in self.sampler:
                metrics = train_step(run, [run.train_data.pairs[i] for i in indices])
                self.step += 1
                self.total_tokens += metrics["num_tokens"]
                self.metrics_logger.log(self.step, "train", metrics)
                self.progress.update(metrics)
                if self._periodic(dpo.val_period):
                    self._validate()
                if self._periodic(self.cfg.checkpointing.save_period):
                    self._save()
                if self.step >= run.total_steps:
                    break
        self.progress.close()
        if dpo.val_at_end and not self._periodic(dpo.val_period):
            self._validate()
        self._save()
        return self._finish()

    def _announce(self) -> None:
        run = self.run
        train = run.train_data
        self._write(
            f"megatron_dpo: {run.layout.world_size} rank(s) = TP {run.layout.tp_size} x PP {run.layout.pp_size}"
            f" x DP {run.layout.dp_size}; {len(train.pairs)} train pairs, {run.total_steps} steps of "
            f"{self.cfg.policy.train_global_batch_size} pairs ({run.layout.num_microbatches} micro-batches per rank)"
        )
        for name, data in (("train", train), ("val", run.val_data)):
            if data is not None and (data.num_dropped or data.num_truncated):
                self._write(
                    f"{name} data: {data.num_dropped} pairs dropped and {data.num_truncated} truncated to "
                    f"policy.max_total_sequence_length={self.cfg.policy.max_total_sequence_length} "
                    f"(data.overlength_policy={self.cfg.data.overlength_policy})"
                )

    def _finish(self) -> Dict[str, object]:
        wall = time.perf_counter() - self.start_time
        summary = {
            "steps": self.step,
            "pairs_seen": self.sampler.consumed_pairs,
            "wall_time_s": round(wall, 2),
            "tokens_per_sec": round(self.total_tokens / wall, 1) if wall > 0 else 0.0,
            "run_dir": os.path.abspath(self.run_dir),
            "checkpoint": os.path.abspath(os.path.join(self.run_dir, f"step_{self.last_saved_step}"))
            if self.last_saved_step is not None else None,
        }
        if self.val_history:
            final, best = self.val_history[-1], max(self.val_history, key=lambda m: m["accuracy"])
            summary.update(
                final_val_accuracy=final["accuracy"], final_val_loss=final["loss"],
                best_val_accuracy=best["accuracy"], best_val_step=best["step"],
                best_val_loss=min(m["loss"] for m in self.val_history),
            )
        self.metrics_logger.close()
        if self.is_rank0:
            self._plot()
            write_summary(self.run_dir, summary)
            print_summary(summary)
        return summary


def train(cfg: Config) -> Dict[str, object]:
    run = setup_run(cfg)
    if run.ctx.is_rank0:
        os.makedirs(cfg.checkpointing.checkpoint_dir, exist_ok=True)
        save_config(cfg, os.path.join(cfg.checkpointing.checkpoint_dir, "config.yaml"))
    return Trainer(run).fit()
