"""Wrap the policy for training: megatron-core DDP, optimizer, LR schedule.

As in megatron-core's ``examples/run_simple_mcore_train_loop.py``: DDP over
each model chunk, ``get_megatron_optimizer``, ``OptimizerParamScheduler``
(without it megatron ignores no-weight-decay on biases and norms), and the
hooks the pipeline schedule calls (no_sync, grad_sync, param_sync,
finalize_model_grads, grad_scale), set as megatron's own training loop
(megatron/training/training.py) sets them.

Overlap (``policy.megatron_cfg.distributed_data_parallel_config``):
- ``overlap_grad_reduce``: megatron's default buckets (max(40M, 1M x DP)
  elements); each bucket's all-reduce / reduce-scatter starts as soon as its
  grads are ready in the last micro-batch's backward. Off: one bucket, reduced
  in ``finalize_model_grads``.
- ``overlap_param_gather`` (distributed optimizer only): the optimizer step
  leaves other DP ranks' parameter shards stale; DDP's forward pre-hooks
  all-gather them bucket by bucket in the next forward (prefetching the next
  bucket), or, with the interleaved pipeline, the schedule's
  ``param_sync_func`` starts each chunk's gather (``align_param_gather``).
  Anything that reads parameters outside a forward pass (checkpoint save)
  first calls ``finish_param_sync``.
"""

from typing import List

import torch

from megatron_dpo.config.schema import MegatronConfig


def wrap_ddp(chunks: List[torch.nn.Module], megatron_cfg: MegatronConfig) -> List[torch.nn.Module]:
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    overlap = megatron_cfg.distributed_data_parallel_config
    use_distributed_optimizer = megatron_cfg.optimizer.use_distributed_optimizer
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=overlap.overlap_grad_reduce,
        # Only meaningful with the distributed optimizer (config/validate.py refuses it without).
        overlap_param_gather=overlap.overlap_param_gather and use_distributed_optimizer,
        # Only the interleaved schedule calls param_sync_func; elsewhere the
        # pre-hooks prefetch the next bucket.
        align_param_gather=megatron_cfg.virtual_pipeline_model_parallel_size is not None,
        use_distributed_optimizer=use_distributed_optimizer,
    )
    return [
        DistributedDataParallel(
            config=chunk.config,
            ddp_config=ddp_config,
            module=chunk,
            # Only the first chunk's grads are bucketed with VPP (megatron-core's rule).
            disable_bucketing=index > 0,
        )
        for index, chunk in enumerate(chunks)
    ]


def build_optimizer(chunks, megatron_cfg: MegatronConfig, precision: str, max_grad_norm: float):
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    opt = megatron_cfg.optimizer
    config = OptimizerConfig(
        optimizer=opt.optimizer,
        lr=opt.lr,
        min_lr=opt.min_lr,
        weight_decay=opt.weight_decay,
        adam_beta1=opt.adam_beta1,
        adam_beta2=opt.adam_beta2,
        adam_eps=opt.adam_eps,
        clip_grad=max_grad_norm,
        bf16=precision == "bfloat16",
        params_dtype=torch.float32,
        use_distributed_optimizer=opt.use_distributed_optimizer,
    )
    return get_megatron_optimizer(config, chunks)


def build_scheduler(optimizer, megatron_cfg: MegatronConfig, total_steps: int):
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    opt, sched = megatron_cfg.optimizer, megatron_cfg.scheduler
    warmup = min(sched.lr_warmup_iters, max(total_steps - 1, 0))
    decay_steps = sched.lr_decay_iters or total_steps
    return OptimizerParamScheduler(
        optimizer,
        init_lr=sched.lr_warmup_init,
        max_lr=opt.lr,
        min_lr=opt.min_lr,
        lr_warmup_steps=warmup,
        lr_decay_steps=max(decay_steps, warmup + 1),
        lr_decay_style=sched.lr_decay_style,
        start_wd=opt.weight_decay,
        end_wd=opt.weight_decay,
        wd_incr_steps=max(total_steps, 1),
        wd_incr_style="constant",
    )


def install_schedule_hooks(ddp_chunks, optimizer) -> None:
    """The callbacks megatron-core's schedule reads from the model config."""
    from megatron.core.distributed import finalize_model_grads

    def per_chunk(funcs):
        return funcs[0] if len(funcs) == 1 else funcs

    config = ddp_chunks[0].config
    ddp_config = ddp_chunks[0].ddp_config
    config.no_sync_func = per_chunk([chunk.no_sync for chunk in ddp_chunks])
    if ddp_config.overlap_grad_reduce:
        config.grad_sync_func = per_chunk([chunk.start_grad_sync for chunk in ddp_chunks])
    if ddp_config.overlap_param_gather and ddp_config.align_param_gather:
        config.param_sync_func = per_chunk([chunk.start_param_sync for chunk in ddp_chunks])
    config.finalize_model_grads_func = finalize_model_grads
    config.grad_scale_func = optimizer.scale_loss
