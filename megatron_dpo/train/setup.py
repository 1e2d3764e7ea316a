"""Assemble a run: process groups, data, policy + reference, optimizer."""

import logging
from dataclasses import dataclass
from typing import List, Optional

import torch

from megatron_dpo.config.schema import Config, LossConfig
from megatron_dpo.config.validate import ParallelLayout, resolve_layout, resolve_val_num_microbatches
from megatron_dpo.data import TokenizeResult, build_dataset
from megatron_dpo.models.architecture import ModelArchitecture
from megatron_dpo.models.build import build_model
from megatron_dpo.models.source import ModelSource, load_tokenizer, load_weights, resolve_source
from megatron_dpo.parallel.init import ParallelContext, init_distributed, init_parallel
from megatron_dpo.train.optimizer import build_optimizer, build_scheduler, install_schedule_hooks, wrap_ddp

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
    val_data: Optional[TokenizeResult]
    policy: List[torch.nn.Module]
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


def _load_data(cfg: Config, tokenizer):
    max_length = cfg.policy.max_total_sequence_length
    train = build_dataset(cfg.data.train_data_path, cfg.data, tokenizer, max_length)
    val = None
    if cfg.data.val_data_path:
        val = build_dataset(cfg.data.val_data_path, cfg.data, tokenizer, max_length)
    return train, val


def build_policy_and_reference(cfg: Config, source: ModelSource, ctx: ParallelContext):
    """Two models of one layout from the same weights: the policy trains, the
    reference stays frozen (no grads, no optimizer state)."""
    megatron_cfg = cfg.policy.megatron_cfg
    models = []
    for trainable in (True, False):
        chunks = build_model(
            source.arch, ctx, cfg.policy.precision, megatron_cfg.sequence_parallel,
            megatron_cfg.activation_checkpointing, trainable=trainable,
        )
        load_weights(chunks, source, ctx, cfg.dpo.seed)
        models.append(chunks)
    return models


def setup_run(cfg: Config) -> Run:
    init_distributed()
    source = resolve_source(cfg.policy)
    arch = source.arch
    world_size = torch.distributed.get_world_size()
    layout = resolve_layout(cfg.policy, world_size, arch.num_layers, arch.num_attention_heads, arch.num_query_groups)
    if cfg.data.val_data_path:
        resolve_val_num_microbatches(cfg.dpo, layout)
    megatron_cfg = cfg.policy.megatron_cfg
    ctx = init_parallel(layout.tp_size, layout.pp_size, layout.vpp_size, cfg.dpo.seed)
    tokenizer = load_tokenizer(source, cfg.policy.tokenizer.chat_template)
    train_data, val_data = _load_data(cfg, tokenizer)
    steps = total_steps(cfg, len(train_data.pairs))
    policy, reference = build_policy_and_reference(cfg, source, ctx)
    policy = wrap_ddp(policy, megatron_cfg.optimizer.use_distributed_optimizer)
    optimizer = build_optimizer(policy, megatron_cfg, cfg.policy.precision, cfg.policy.max_grad_norm)
    scheduler = build_scheduler(optimizer, megatron_cfg, steps)
    install_schedule_hooks(policy, optimizer)
    return Run(
        cfg=cfg, ctx=ctx, layout=layout, source=source, arch=arch, tokenizer=tokenizer,
        pad_id=tokenizer.pad_token_id, train_data=train_data, val_data=val_data,
        policy=policy, reference=reference, optimizer=optimizer, scheduler=scheduler,
        total_steps=steps,
    )
