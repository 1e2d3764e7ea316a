"""Cross-field checks that need the world size or the model's shape.

``check_layout`` checks the policy's parallel sizes against WORLD_SIZE and the
model and derives the data-parallel size and micro-batch count, or raises a
``ConfigError`` stating the numbers and the fix (torchtitan style) before
megatron-core gets to fail with a bare assert deep in model build or the
pipeline schedule. ``parallel.dims.ParallelDims.resolve`` wraps it into the
run's one layout object.
"""

import math
from typing import List, Optional, Tuple

from megatron_dpo.config.errors import ConfigError
from megatron_dpo.config.schema import DPOConfig, PolicyConfig

_TP_KEY = "policy.megatron_cfg.tensor_model_parallel_size"
_PP_KEY = "policy.megatron_cfg.pipeline_model_parallel_size"
_VPP_KEY = "policy.megatron_cfg.virtual_pipeline_model_parallel_size"
_SP_KEY = "policy.megatron_cfg.sequence_parallel"
_EP_KEY = "policy.megatron_cfg.expert_model_parallel_size"
_ETP_KEY = "policy.megatron_cfg.expert_tensor_parallel_size"


def check_layout(
    policy_cfg: PolicyConfig,
    world_size: int,
    num_layers: int,
    num_attention_heads: int,
    num_query_groups: int,
    num_experts: Optional[int] = None,
) -> Tuple[int, int]:
    """Check the parallel sizes against the world and the model; returns
    (data-parallel size, micro-batches per step per DP rank). ``num_experts``:
    the model's experts, None for a dense model."""
    megatron_cfg = policy_cfg.megatron_cfg
    tp, pp = megatron_cfg.tensor_model_parallel_size, megatron_cfg.pipeline_model_parallel_size
    vpp = megatron_cfg.virtual_pipeline_model_parallel_size
    _check_world_size(world_size, tp, pp)
    _check_tensor_parallel(tp, num_attention_heads, num_query_groups, megatron_cfg.sequence_parallel)
    _check_pipeline_parallel(pp, vpp, num_layers)
    _check_overlap(megatron_cfg)
    _check_expert_parallel(megatron_cfg, world_size, num_experts)
    if num_experts is not None and policy_cfg.lora_cfg.enabled:
        raise ConfigError(
            "policy.lora_cfg.enabled=true is not supported for Mixture-of-Experts models (no adapters over "
            "the experts yet). Set policy.lora_cfg.enabled=false to train every weight."
        )
    dp = world_size // (tp * pp)
    num_microbatches = _num_microbatches(
        "policy.train_global_batch_size", policy_cfg.train_global_batch_size,
        "policy.train_micro_batch_size", policy_cfg.train_micro_batch_size, dp,
    )
    _check_interleaved_microbatches(pp, vpp, dp, num_microbatches, "policy.train_global_batch_size")
    return dp, num_microbatches


def resolve_val_num_microbatches(dpo_cfg: DPOConfig, dims) -> int:
    """Micro-batches per validation step per DP rank, checked like the training
    batch. ``dims``: the run's ``ParallelDims`` (its dp, pp and vpp sizes)."""
    num_microbatches = _num_microbatches(
        "dpo.val_global_batch_size", dpo_cfg.val_global_batch_size,
        "dpo.val_micro_batch_size", dpo_cfg.val_micro_batch_size, dims.dp_size,
    )
    _check_interleaved_microbatches(dims.pp_size, dims.vpp_size, dims.dp_size, num_microbatches,
                                    "dpo.val_global_batch_size")
    return num_microbatches


def _divisors(n: int) -> List[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _join(values: List[int]) -> str:
    return ", ".join(str(v) for v in values)


def _check_world_size(world_size: int, tp: int, pp: int) -> None:
    if world_size % (tp * pp):
        raise ConfigError(
            f"Invalid parallel layout: tensor_model_parallel_size({tp}) x "
            f"pipeline_model_parallel_size({pp}) = {tp * pp} does not divide WORLD_SIZE({world_size}). "
            f"Use a world size that is a multiple of {tp * pp}, or change {_TP_KEY} / {_PP_KEY}."
        )


def _check_tensor_parallel(tp: int, num_heads: int, num_query_groups: int, sequence_parallel: bool) -> None:
    """Each TP rank holds whole attention heads and whole key/value groups."""
    valid = _join(_divisors(math.gcd(num_heads, num_query_groups)))
    for name, count in (("num_attention_heads", num_heads), ("num_query_groups", num_query_groups)):
        if count % tp:
            raise ConfigError(
                f"Invalid tensor parallel size: {name}({count}) is not divisible by "
                f"tensor_model_parallel_size({tp}). Set {_TP_KEY} to one of {valid} (divisors of both "
                f"num_attention_heads({num_heads}) and num_query_groups({num_query_groups}))."
            )
    if sequence_parallel and tp == 1:
        raise ConfigError(
            f"Invalid parallel layout: sequence_parallel=true needs tensor_model_parallel_size > 1 "
            f"(got 1). Set {_SP_KEY}=false, or raise {_TP_KEY}."
        )


def _check_expert_parallel(megatron_cfg, world_size: int, num_experts: Optional[int]) -> None:
    """Each EP rank holds whole experts; the expert layout (expert-TP x EP x PP)
    tiles the world, as megatron-core's initialize_model_parallel requires."""
    ep, etp, pp = (megatron_cfg.expert_model_parallel_size, megatron_cfg.expert_tensor_parallel_size,
                   megatron_cfg.pipeline_model_parallel_size)
    if num_experts is None:
        if (ep, etp) != (1, 1):
            raise ConfigError(
                f"Invalid parallel layout: expert_model_parallel_size({ep}) / expert_tensor_parallel_size({etp}) "
                f"apply to Mixture-of-Experts models only, and this model has no experts. Set {_EP_KEY}=1 and "
                f"{_ETP_KEY}=1."
            )
        return
    tp = megatron_cfg.tensor_model_parallel_size
    if tp > 1 and not megatron_cfg.sequence_parallel:
        raise ConfigError(
            f"Invalid parallel layout: a Mixture-of-Experts model with tensor_model_parallel_size({tp}) needs "
            f"sequence parallelism (megatron-core's MoE layer refuses to train without it). Set {_SP_KEY}=true, "
            f"or {_TP_KEY}=1."
        )
    if num_experts % ep:
        raise ConfigError(
            f"Invalid expert parallel size: num_experts({num_experts}) is not divisible by "
            f"expert_model_parallel_size({ep}). Set {_EP_KEY} to one of {_join(_divisors(num_experts))}."
        )
    if world_size % (etp * ep * pp):
        raise ConfigError(
            f"Invalid parallel layout: expert_tensor_parallel_size({etp}) x expert_model_parallel_size({ep}) x "
            f"pipeline_model_parallel_size({pp}) = {etp * ep * pp} does not divide WORLD_SIZE({world_size}). "
            f"Use a world size that is a multiple of {etp * ep * pp}, or change {_EP_KEY} / {_ETP_KEY}."
        )


def _check_overlap(megatron_cfg) -> None:
    if megatron_cfg.distributed_data_parallel_config.overlap_param_gather and \
            not megatron_cfg.optimizer.use_distributed_optimizer:
        raise ConfigError(
            "policy.megatron_cfg.distributed_data_parallel_config.overlap_param_gather=true needs the "
            "distributed optimizer (there are no parameter shards to gather without it). Set "
            "policy.megatron_cfg.optimizer.use_distributed_optimizer=true, or overlap_param_gather=false."
        )


def _check_pipeline_parallel(pp: int, vpp: Optional[int], num_layers: int) -> None:
    """Each pipeline stage (and each virtual chunk of it) holds the same number of layers."""
    if num_layers % pp:
        raise ConfigError(
            f"Invalid pipeline parallel size: num_layers({num_layers}) is not divisible by "
            f"pipeline_model_parallel_size({pp}). Set {_PP_KEY} to one of {_join(_divisors(num_layers))}."
        )
    if vpp is None:
        return
    if pp == 1:
        raise ConfigError(
            f"Invalid parallel layout: virtual_pipeline_model_parallel_size({vpp}) needs "
            f"pipeline_model_parallel_size > 1 (got 1). Set {_VPP_KEY}=null, or raise {_PP_KEY}."
        )
    if num_layers % (pp * vpp):
        valid = _join([v for v in _divisors(num_layers // pp) if v > 1]) or "none"
        raise ConfigError(
            f"Invalid virtual pipeline size: num_layers({num_layers}) is not divisible by "
            f"pipeline_model_parallel_size({pp}) x virtual_pipeline_model_parallel_size({vpp}) = "
            f"{pp * vpp}. Set {_VPP_KEY} to one of: {valid}, or to null."
        )


def _num_microbatches(global_key: str, global_size: int, micro_key: str, micro_size: int, dp: int) -> int:
    """Every DP rank runs the same number of whole micro-batches per step."""
    per_step = micro_size * dp
    if global_size % per_step:
        lower, upper = (global_size // per_step) * per_step, (global_size // per_step + 1) * per_step
        nearest = f"{lower} or {upper}" if lower else f"{upper}"
        raise ConfigError(
            f"Invalid batch size: {global_key}({global_size}) is not divisible by "
            f"{micro_key}({micro_size}) x data-parallel size({dp}) = {per_step}. "
            f"Set {global_key} to a multiple of {per_step} (nearest: {nearest}), or change {micro_key}."
        )
    return global_size // per_step


def _check_interleaved_microbatches(pp: int, vpp: Optional[int], dp: int, num_microbatches: int,
                                    global_key: str) -> None:
    """megatron-core 0.16.1's interleaved schedule runs micro-batches in groups
    of PP (``microbatch_group_size_per_vp_stage``) and refuses a last group of
    fewer than PP: the count must be a multiple of PP (at least PP)."""
    if vpp is not None and (num_microbatches < pp or num_microbatches % pp):
        why = "fewer than" if num_microbatches < pp else "not a multiple of"
        raise ConfigError(
            f"Invalid batch size for the interleaved pipeline: {global_key} gives {num_microbatches} "
            f"micro-batches per DP rank, {why} pipeline_model_parallel_size({pp}). Set {global_key} to "
            f"a multiple of {pp} x micro batch size x data-parallel size({dp}), or set {_VPP_KEY}=null."
        )
