"""Assemble a run, in the startup order of DESIGN.md: config -> parallel layout
-> resume source -> data -> models (each weight read once) -> optimizer.

What is decided before any model is built: the layout (``ParallelDims``) and
where the policy's weights come from (``resume_dir``: a checkpoint, or None
for the source). Then every weight is read at most once per process:
- fresh start: the policy reads the source; an online reference copies the
  policy's freshly loaded weights; a missing reference cache is computed by
  the policy itself before its first update (policy == reference then);
- resume: the policy is filled from the checkpoint only (with the optimizer,
  train/resume.py); an online reference reads the source once; a cached
  reference reads nothing, or the source once if a cache is missing.
"""

import logging
import os
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
import torch.distributed as dist

from megatron_dpo.checkpoint.hf_export import check_export_dir
from megatron_dpo.checkpoint.lock import RunLock
from megatron_dpo.checkpoint.source import ModelSource, load_source_weights, load_tokenizer, resolve_source
from megatron_dpo.config.errors import ConfigError
from megatron_dpo.config.schema import Config, LossConfig
from megatron_dpo.config.validate import resolve_val_num_microbatches
from megatron_dpo.data import DataError, TokenizeResult, open_tokenized, split_paths
from megatron_dpo.logging import timed
from megatron_dpo.loss.registry import check_loss_config, get_preference_loss
from megatron_dpo.models.architecture import ModelArchitecture
from megatron_dpo.models.build import MoESettings, build_model
from megatron_dpo.models.lora import apply_lora, fresh_adapter, read_peft_adapter, reference_adapters
from megatron_dpo.models.kernels import (KernelPlan, detect_env, fusion_settings, resolve_kernels,
                                         sequence_parallel_problem)
from megatron_dpo.parallel.dims import ParallelDims
from megatron_dpo.parallel.init import get_device, init_distributed, init_parallel
from megatron_dpo.train import reference as reference_logps
from megatron_dpo.train.optimizer import build_optimizer, build_scheduler, install_schedule_hooks, wrap_ddp
from megatron_dpo.train.resume import claim_run_dir, on_rank0, prepare_run_dir

logger = logging.getLogger(__name__)


@dataclass
class Run:
    cfg: Config
    dims: ParallelDims
    source: ModelSource
    tokenizer: object
    # A TokenizedDataset (memory-mapped cache), or a TokenizeResult given by the caller.
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
    # The step directory the policy continues from (train/resume.py loads it);
    # None: a fresh start from the source.
    resume_dir: Optional[str]
    # Rank 0's lock on checkpointing.checkpoint_dir (None on other ranks).
    lock: Optional[RunLock] = None

    @property
    def arch(self) -> ModelArchitecture:
        return self.source.arch

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id

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


def _load_data(cfg: Config, tokenizer, paths: Dict[str, str]) -> Dict[str, TokenizeResult]:
    """Every data set by split name ("train", "val", "val/<name>")."""
    max_length = cfg.policy.max_total_sequence_length
    cache_dir = cfg.data.cache_dir or os.path.join(cfg.checkpointing.checkpoint_dir, "tokenized_cache")
    with timed(f"opening the tokenized data ({cache_dir})"):
        datasets = {name: open_tokenized(path, cfg.data, tokenizer, max_length, cache_dir)
                    for name, path in paths.items()}
    _log_builders(datasets, paths)
    for name, data in datasets.items():  # fail here, not at the first validation
        if name != "train" and len(data.pairs) < cfg.dpo.val_global_batch_size:
            raise DataError(
                f"{paths[name]} ({name}) holds {len(data.pairs)} usable pairs, fewer than one validation batch "
                f"(dpo.val_global_batch_size={cfg.dpo.val_global_batch_size}): add pairs, or lower "
                "dpo.val_global_batch_size (a multiple of dpo.val_micro_batch_size x data-parallel size)"
            )
    if get_preference_loss(cfg.loss_fn.preference_loss).needs_gt_rewards:  # fail here, not in the first step
        for name, path in paths.items():
            if datasets[name].pairs[0].chosen_reward is None:
                raise DataError(
                    f"loss_fn.preference_loss={cfg.loss_fn.preference_loss} needs ground-truth rewards, but "
                    f"{path} has no 'chosen_reward' / 'rejected_reward' fields; add them to every record, "
                    "or pick a loss without them (e.g. loss_fn.preference_loss=dpo)"
                )
    return datasets


def _log_builders(datasets: Dict[str, TokenizeResult], paths: Dict[str, str]) -> None:
    """Collective: rank 0 says how many processes tokenized each data set (1, or 0: reused)."""
    built = torch.tensor([int(data.built_here) for data in datasets.values()], device=get_device())
    dist.all_reduce(built)
    for (name, data), count in zip(datasets.items(), built.tolist()):
        how = f"built by {count} of {dist.get_world_size()} processes" if count else "reused"
        logger.info("tokenized cache of %s (%s): %s, %s", paths[name], name, how, data.directory)
def kernel_plan(cfg: Config) -> KernelPlan:
    """The layer spec, fusions and attention this machine runs (models/kernels.py)."""
    env = detect_env()
    problem = sequence_parallel_problem(cfg.policy.megatron_cfg.sequence_parallel, env)
    if problem is not None:
        raise ConfigError(problem)
    try:
        return resolve_kernels(fusion_settings(cfg.policy.megatron_cfg), env)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def build_chunks(cfg: Config, arch: ModelArchitecture, dims: ParallelDims, trainable: bool) -> List[torch.nn.Module]:
    """This rank's chunks of the policy (trainable) or the frozen reference (no
    grads, no optimizer state), both of one layout; weights not yet loaded."""
    megatron_cfg = cfg.policy.megatron_cfg
    return build_model(arch, dims, cfg.policy.precision, megatron_cfg.sequence_parallel,
                       megatron_cfg.activation_checkpointing, trainable=trainable,
                       prefix_sharing=cfg.data.prefix_sharing, kernels=kernel_plan(cfg),
                       moe=MoESettings.from_megatron_cfg(megatron_cfg))


def build_from_source(cfg: Config, source: ModelSource, dims: ParallelDims, trainable: bool) -> List[torch.nn.Module]:
    """Model chunks filled from the source: one read of its weights."""
    with timed(f"building the {'policy' if trainable else 'reference'} and reading its weights ({source.path})"):
        chunks = build_chunks(cfg, source.arch, dims, trainable)
        load_source_weights(chunks, source, dims, cfg.dpo.seed)
    return chunks


@torch.no_grad()
def copy_weights(source_chunks: List[torch.nn.Module], target_chunks: List[torch.nn.Module]) -> None:
    """Fill ``target`` from ``source`` of the same build (layout, dtype): no disk read."""
    for source_chunk, target_chunk in zip(source_chunks, target_chunks, strict=True):
        for (name, param), (target_name, target) in zip(source_chunk.named_parameters(),
                                                        target_chunk.named_parameters(), strict=True):
            assert name == target_name and param.shape == target.shape, (name, target_name)
            target.copy_(param)


def _prepare(cfg: Config, source: Optional[ModelSource]):
    """Process groups, model source, layout and tokenizer: what precedes data and models."""
    check_loss_config(cfg.loss_fn)
    init_distributed()
    source = source or resolve_source(cfg.policy)
    arch = source.arch
    dims = ParallelDims.resolve(cfg.policy, dist.get_world_size(), arch.num_layers, arch.num_attention_heads,
                                arch.num_query_groups, arch.num_experts)
    paths = split_paths(cfg.data)
    if len(paths) > 1:
        resolve_val_num_microbatches(cfg.dpo, dims)
    dims = init_parallel(dims, cfg.dpo.seed)
    tokenizer = load_tokenizer(source, cfg.policy.tokenizer.chat_template)
    return source, dims, paths, tokenizer


def precompute_reference(cfg: Config) -> None:
    """Load, or compute and store, the reference caches of every data set;
    no training (scripts/precompute_reference.py)."""
    source, dims, paths, tokenizer = _prepare(cfg, None)
    lock = on_rank0(lambda: claim_run_dir(cfg.checkpointing.checkpoint_dir), dims)  # the caches live there
    datasets = _load_data(cfg, tokenizer, paths)
    found, missing = reference_logps.load_caches(cfg, source, datasets)
    if missing:
        reference = build_from_source(cfg, source, dims, trainable=False)
        reference_logps.compute_caches(cfg, dims, source.arch.vocab_size, tokenizer.pad_token_id, datasets,
                                       missing, paths, reference)
    if lock is not None:  # rank 0
        lock.release()


def build_models(cfg: Config, source: ModelSource, dims: ParallelDims, resume_dir: Optional[str], pad_id: int,
                 datasets: Dict[str, TokenizeResult], paths: Dict[str, str]):
    """(policy chunks, reference chunks) with each weight read at most once
    (see the module docstring); cached / none: every pair of ``datasets``
    (read from ``paths``) gets its reference log-probs and the reference
    chunks are []."""
    if cfg.policy.lora_cfg.enabled:
        return build_lora_policy(cfg, source, dims, pad_id, datasets, paths), []
    mode, vocab_size = cfg.reference.mode, source.arch.vocab_size
    found, missing = reference_logps.load_caches(cfg, source, datasets) if mode == "cached" else ({}, {})
    if missing and resume_dir is not None:
        # The policy comes from the checkpoint: the reference needs the source,
        # built, run and freed before the policy takes its memory.
        reference = build_from_source(cfg, source, dims, trainable=False)
        found.update(reference_logps.compute_caches(cfg, dims, vocab_size, pad_id, datasets, missing, paths,
                                                    reference))
        del reference
        reference_logps.free_memory()
        missing = {}
    if resume_dir is None:
        policy = build_from_source(cfg, source, dims, trainable=True)
    else:  # train/resume.py fills it (and the optimizer) from the checkpoint
        policy = build_chunks(cfg, source.arch, dims, trainable=True)
    if missing:  # fresh start: the policy is the reference until its first update
        found.update(reference_logps.compute_caches(cfg, dims, vocab_size, pad_id, datasets, missing, paths, policy))
    if mode == "online":
        if resume_dir is None:
            reference = build_chunks(cfg, source.arch, dims, trainable=False)
            copy_weights(policy, reference)
        else:
            reference = build_from_source(cfg, source, dims, trainable=False)
        return policy, reference
    for name, data in datasets.items():
        logps = found[name] if mode == "cached" else torch.zeros(len(data.pairs), 2)  # none: reference-free
        data.set_reference_logps(logps)
    return policy, []


def build_lora_policy(cfg: Config, source: ModelSource, dims: ParallelDims, pad_id: int,
                      datasets: Dict[str, TokenizeResult], paths: Dict[str, str]) -> List[torch.nn.Module]:
    """The policy of a LoRA run: the frozen base (read once from the source,
    fresh start or resume alike: a LoRA checkpoint holds the adapters only)
    plus the initial adapters. The reference is this model with its initial
    adapters (models/lora.py): no reference model is built; cached / none
    give every pair its reference log-probs as in ``build_models``."""
    lora_cfg, mode = cfg.policy.lora_cfg, cfg.reference.mode
    policy = build_from_source(cfg, source, dims, trainable=True)
    if lora_cfg.init_adapter_path is None:
        initial = lambda name, shape: fresh_adapter(name, shape, cfg.dpo.seed)  # noqa: E731
    else:
        initial = read_peft_adapter(lora_cfg.init_adapter_path, lora_cfg)
    apply_lora(policy, source.arch, dims, lora_cfg, initial)
    if mode == "online":
        return policy
    found, missing = reference_logps.load_caches(cfg, source, datasets) if mode == "cached" else ({}, {})
    if missing:
        with reference_adapters(policy):
            found.update(reference_logps.compute_caches(cfg, dims, source.arch.vocab_size, pad_id, datasets,
                                                        missing, paths, policy))
    for name, data in datasets.items():
        data.set_reference_logps(found[name] if mode == "cached" else torch.zeros(len(data.pairs), 2))
    return policy


def setup_run(cfg: Config, source: Optional[ModelSource] = None,
              datasets: Optional[Dict[str, TokenizeResult]] = None, use_run_dir: bool = True) -> Run:
    """``source`` and ``datasets`` ("train", ...) stand in for policy.model_name
    and the data files when given, and ``use_run_dir=False`` starts fresh
    without looking at checkpoint_dir (scripts/benchmark.py's synthetic runs)."""
    source, dims, paths, tokenizer = _prepare(cfg, source)
    # Decided before any model is built: where the policy's weights come from.
    resume_dir, lock = prepare_run_dir(cfg, dims) if use_run_dir else (None, None)
    for out_dir in (cfg.checkpointing.export_hf_dir, cfg.checkpointing.export_adapter_dir):
        if out_dir is not None:  # refuse a bad target before training
            sources = [path for path in (cfg.policy.model_name, cfg.checkpointing.checkpoint_dir,
                                         cfg.policy.lora_cfg.init_adapter_path) if path and os.path.isdir(path)]
            on_rank0(lambda: check_export_dir(out_dir, sources), dims)  # noqa: B023
    datasets = dict(datasets) if datasets is not None else _load_data(cfg, tokenizer, paths)
    policy, reference = build_models(cfg, source, dims, resume_dir, tokenizer.pad_token_id, datasets, paths)
    train_data = datasets.pop("train")
    steps = total_steps(cfg, len(train_data.pairs))
    megatron_cfg = cfg.policy.megatron_cfg
    policy = wrap_ddp(policy, megatron_cfg)
    optimizer = build_optimizer(policy, megatron_cfg, cfg.policy.precision, cfg.policy.max_grad_norm)
    scheduler = build_scheduler(optimizer, megatron_cfg, steps)
    install_schedule_hooks(policy, optimizer)
    return Run(
        cfg=cfg, dims=dims, source=source, tokenizer=tokenizer, train_data=train_data, val_data=datasets,
        policy=policy, reference=reference, optimizer=optimizer, scheduler=scheduler, total_steps=steps,
        resume_dir=resume_dir, lock=lock,
    )
