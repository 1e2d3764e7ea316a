"""Assemble a run: process groups, data, reference log-probs, policy, optimizer."""

import logging
from dataclasses import dataclass
from functools import partial
from typing import Dict, List, Optional

import torch

from megatron_dpo.config.schema import Config, LossConfig
from megatron_dpo.config.validate import ParallelLayout, resolve_layout, resolve_val_num_microbatches
from megatron_dpo.data import DataError, TokenizeResult, build_dataset, split_paths
from megatron_dpo.logging import timed
from megatron_dpo.loss.registry import NEEDS_GT_REWARDS
from megatron_dpo.models.architecture import ModelArchitecture
from megatron_dpo.models.build import build_model
from megatron_dpo.models.source import ModelSource, load_tokenizer, load_weights, resolve_source
from megatron_dpo.parallel.init import ParallelContext, init_distributed, init_parallel
from megatron_dpo.train.optimizer import build_optimizer, build_scheduler, install_schedule_hooks, wrap_ddp
from megatron_dpo.train.reference import build_caches, prepare_reference

logger = logging.getLogger(__name__)


@dataclass
class Run:
    cfg: Config
    ctx: ParallelContext
    layout: ParallelLayout
    source: ModelSource
    arch: ModelArchitecture
    tokenizer: object
    pad_id: int
    train_data: TokenizeResult
    # Validation sets by metric split: "val", "val/<name>" (see data.split_paths).
    val_data: Dict[str, TokenizeResult]
    policy: List[torch.nn.Module]
    # The frozen reference (reference.mode=online); [] when its log-probs ride
    # with the pairs (cached / none).
    reference: List[torch.nn.Module]
    optimizer: object
    scheduler: object
    total_steps: int

    @property
    def loss_cfg(self) -> LossConfig:
        return self.cfg.loss_fn

    @property
    def micro_batch_size(self) -> int:
        return self.cfg.policy.train_micro_batch_size


def total_steps(cfg: Config, num_train_pairs: int) -> int:
    steps_per_epoch = num_train_pairs // cfg.policy.train_global_batch_size
    steps = steps_per_epoch * cfg.dpo.max_num_epochs
    if cfg.dpo.max_num_steps is not None:
        steps = min(steps, cfg.dpo.max_num_steps)
    return steps


def _load_data(cfg: Config, tokenizer) -> Dict[str, TokenizeResult]:
    """Every data set by split name ("train", "val", "val/<name>")."""
    max_length = cfg.policy.max_total_sequence_length
    with timed("loading and tokenizing the data"):
        datasets = {name: build_dataset(path, cfg.data, tokenizer, max_length)
                    for name, path in split_paths(cfg.data).items()}
    _check_gt_rewards(cfg, datasets)
    return datasets


def _check_gt_rewards(cfg: Config, datasets: Dict[str, TokenizeResult]) -> None:
    """A loss that needs the data's rewards fails here, not in the first step."""
    if cfg.loss_fn.preference_loss not in NEEDS_GT_REWARDS:
        return
    for name, path in split_paths(cfg.data).items():
        if datasets[name].pairs[0].chosen_reward is None:
            raise DataError(
                f"loss_fn.preference_loss={cfg.loss_fn.preference_loss} needs ground-truth rewards, but "
                f"{path} has no 'chosen_reward' / 'rejected_reward' fields; add them to every record, "
                "or pick a loss without them (e.g. loss_fn.preference_loss=dpo)"
            )


def build_chunks(cfg: Config, source: ModelSource, ctx: ParallelContext, trainable: bool) -> List[torch.nn.Module]:
    """This rank's chunks of a model with the source's weights: the policy
    (trainable) or the frozen reference (no grads, no optimizer state); both
    of one layout."""
    megatron_cfg = cfg.policy.megatron_cfg
    with timed(f"building the {'policy' if trainable else 'reference'} and loading its weights ({source.path})"):
        chunks = build_model(
            source.arch, ctx, cfg.policy.precision, megatron_cfg.sequence_parallel,
            megatron_cfg.activation_checkpointing, trainable=trainable, prefix_sharing=cfg.data.prefix_sharing,
        )
        load_weights(chunks, source, ctx, cfg.dpo.seed)
    return chunks


def _prepare(cfg: Config, source: Optional[ModelSource] = None,
             datasets: Optional[Dict[str, TokenizeResult]] = None):
    """Process groups, model source, tokenizer and data: what precedes the models."""
    init_distributed()
    source = source or resolve_source(cfg.policy)
    arch = source.arch
    world_size = torch.distributed.get_world_size()
    layout = resolve_layout(cfg.policy, world_size, arch.num_layers, arch.num_attention_heads, arch.num_query_groups)
    if len(split_paths(cfg.data)) > 1:
        resolve_val_num_microbatches(cfg.dpo, layout)
    ctx = init_parallel(layout.tp_size, layout.pp_size, layout.vpp_size, cfg.dpo.seed)
    tokenizer = load_tokenizer(source, cfg.policy.tokenizer.chat_template)
    return source, layout, ctx, tokenizer, datasets if datasets is not None else _load_data(cfg, tokenizer)


def precompute_reference(cfg: Config) -> None:
    """Load, or compute and store, the reference caches of every data set;
    no training (scripts/precompute_reference.py)."""
    source, layout, ctx, tokenizer, datasets = _prepare(cfg)
    build_caches(cfg, source, ctx, layout, tokenizer.pad_token_id, datasets,
                 partial(build_chunks, cfg, source, ctx, trainable=False))


def setup_run(cfg: Config, source: Optional[ModelSource] = None,
              datasets: Optional[Dict[str, TokenizeResult]] = None) -> Run:
    """``source`` and ``datasets`` ("train", ...) stand in for policy.model_name
    and the data files when given (scripts/benchmark.py's synthetic model and pairs)."""
    source, layout, ctx, tokenizer, datasets = _prepare(cfg, source, datasets)
    arch = source.arch
    megatron_cfg = cfg.policy.megatron_cfg
    train_data = datasets.pop("train")
    steps = total_steps(cfg, len(train_data.pairs))
    # Before the policy: a cached-mode reference is built, run and freed
    # before the policy takes its memory.
    reference = prepare_reference(cfg, source, ctx, layout, tokenizer.pad_token_id, {"train": train_data, **datasets},
                                  partial(build_chunks, cfg, source, ctx, trainable=False))
    policy = build_chunks(cfg, source, ctx, trainable=True)
    policy = wrap_ddp(policy, megatron_cfg.optimizer.use_distributed_optimizer)
    optimizer = build_optimizer(policy, megatron_cfg, cfg.policy.precision, cfg.policy.max_grad_norm)
    scheduler = build_scheduler(optimizer, megatron_cfg, steps)
    install_schedule_hooks(policy, optimizer)
    return Run(
        cfg=cfg, ctx=ctx, layout=layout, source=source, arch=arch, tokenizer=tokenizer,
        pad_id=tokenizer.pad_token_id, train_data=train_data, val_data=datasets,
        policy=policy, reference=reference, optimizer=optimizer, scheduler=scheduler,
        total_steps=steps,
    )
