"""One training step and one validation batch, and their metric reduction."""

import math
import time
from contextlib import nullcontext
from typing import Callable, ContextManager, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

from megatron_dpo.config.schema import DataConfig
from megatron_dpo.data import TokenizedPair, make_microbatches
from megatron_dpo.models.lora import reference_adapters
from megatron_dpo.parallel.dims import ParallelDims
from megatron_dpo.parallel.init import get_device
from megatron_dpo.train.router_metrics import RouterMetrics, tracked_losses
from megatron_dpo.train.schedule import METRIC_SUMS, PolicyPassResult, RouterLossCoeffs, policy_pass, reference_pass

# timer(phase) -> a context manager around "reference", "policy", "optimizer"
# (scripts/benchmark.py times them; training passes none).
PhaseTimer = Callable[[str], ContextManager]


def device_microbatches(pairs: List[TokenizedPair], micro_batch_size: int, pad_id: int,
                        data_cfg: DataConfig) -> List[dict]:
    """The pairs' micro-batches, padded or packed as ``data_cfg`` says, on the run device."""
    microbatches = make_microbatches(pairs, micro_batch_size, pad_id, data_cfg.packing, data_cfg.prefix_sharing)
    device = get_device()
    return [{key: value.to(device) if torch.is_tensor(value) else value for key, value in batch.items()}
            for batch in microbatches]


def reference_logps_of(run, microbatches: List[dict], seq_length: int) -> List[Optional[torch.Tensor]]:
    """Per micro-batch, the [2B] reference log-probs (None off the last stage).
    Online: a pass of the reference; cached / none: the pairs carried them
    into each micro-batch (collate)."""
    if run.cfg.policy.lora_cfg.enabled and run.cfg.reference.mode == "online":
        # LoRA: the reference is the policy's base with the initial adapters.
        with reference_adapters(run.policy):
            logps = reference_pass(run.policy, microbatches, seq_length, run.arch.vocab_size)
    elif run.reference:
        logps = reference_pass(run.reference, microbatches, seq_length, run.arch.vocab_size)
    else:
        return [batch["reference_logps"] for batch in microbatches]
    return logps or [None] * len(microbatches)


def _policy_pass(run, microbatches: List[dict], timer: PhaseTimer, forward_only: bool) -> PolicyPassResult:
    seq_length = microbatches[0]["tokens"].shape[1]
    with timer("reference"):
        reference_logps = reference_logps_of(run, microbatches, seq_length)
    with timer("policy"):
        return policy_pass(run.policy, microbatches, reference_logps, seq_length, run.arch.vocab_size,
                           run.loss_cfg, forward_only=forward_only, router_coeffs=router_loss_coeffs(run))


def _tp_split(run) -> int:
    """TP ranks a micro-batch's tokens are split over (sequence parallelism), else 1."""
    return run.dims.tp_size if run.cfg.policy.megatron_cfg.sequence_parallel else 1


def _router_metrics(run) -> RouterMetrics:
    megatron_cfg = run.cfg.policy.megatron_cfg
    losses = tracked_losses(megatron_cfg.moe_router_load_balancing_type, megatron_cfg.moe_aux_loss_coeff,
                            megatron_cfg.moe_z_loss_coeff)
    return RouterMetrics(run.policy, run.arch.num_layers, run.arch.num_experts, _tp_split(run), losses)


def router_loss_coeffs(run) -> Optional[RouterLossCoeffs]:
    if not run.arch.is_moe:
        return None
    megatron_cfg = run.cfg.policy.megatron_cfg
    return RouterLossCoeffs(megatron_cfg.moe_aux_loss_coeff, megatron_cfg.moe_z_loss_coeff, _tp_split(run))


def num_real_tokens(pairs: List[TokenizedPair]) -> int:
    return sum(len(pair.chosen_ids) + len(pair.rejected_ids) for pair in pairs)


def sum_last_stage_shares(values: torch.Tensor, dims: ParallelDims) -> torch.Tensor:
    """Every rank gets the sum over DP ranks of what each DP rank's last
    pipeline stage holds (other stages hold zeros). TP ranks already agree,
    so there is no reduction over TP."""
    values = values.to(get_device())
    dist.all_reduce(values, group=dims.pp_group)
    dist.all_reduce(values, group=dims.dp_group)
    return values.cpu()


def reduce_metrics(sums: torch.Tensor, num_tokens: int, dims: ParallelDims) -> Dict[str, float]:
    """The global means of the per-pair sums (divided by the global pair count)."""
    values = torch.cat([sums, torch.tensor([float(num_tokens if dims.is_last_stage else 0)], dtype=torch.float64)])
    values = sum_last_stage_shares(values, dims)
    num_pairs = values[len(METRIC_SUMS)].item()
    metrics = {name: values[i].item() / num_pairs for i, name in enumerate(METRIC_SUMS)}
    metrics["num_pairs"] = num_pairs
    metrics["num_tokens"] = values[-1].item()
    return metrics


def train_step(run, pairs: List[TokenizedPair], timer: PhaseTimer = nullcontext) -> Dict[str, float]:
    """Reference pass, policy forward/backward, optimizer and LR step."""
    start = time.perf_counter()
    microbatches = device_microbatches(pairs, run.micro_batch_size, run.pad_id, run.cfg.data)
    for chunk in run.policy:
        chunk.zero_grad_buffer()
    run.optimizer.zero_grad()
    router = _router_metrics(run) if run.arch.is_moe else None
    with router or nullcontext():
        result = _policy_pass(run, microbatches, timer, forward_only=False)
    metrics = reduce_metrics(result.sums, num_real_tokens(pairs), run.dims)
    if router is not None:
        metrics.update(router.reduce(run.dims, len(microbatches)))
    with timer("optimizer"):
        updated, grad_norm = optimizer_step(run, metrics["loss"])
    step_time = time.perf_counter() - start
    metrics.update(
        grad_norm=grad_norm,
        lr=run.optimizer.param_groups[0]["lr"],
        step_time=step_time,
        tokens_per_sec=metrics["num_tokens"] / step_time,
        update_skipped=float(not updated),
    )
    return metrics


@torch.no_grad()
def optimizer_step(run, loss: float) -> Tuple[bool, float]:
    """megatron-core 0.16.1's ``ChainedOptimizer.step``, split so that a step
    whose loss or gradient norm is NaN/inf applies no update and leaves the LR
    schedule where it is (as megatron's own loop does for a skipped step).
    Loss and norm are reduced over all ranks, so every rank decides alike.
    Returns (updated, grad norm before clipping)."""
    from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32

    optimizer = run.optimizer
    found_inf = optimizer.prepare_grads()
    grad_norm = float(optimizer.get_grad_norm())
    if found_inf or not (math.isfinite(loss) and math.isfinite(grad_norm)):
        return False, grad_norm
    # The schedule's value at this step number (1-based) applies to this step,
    # so the first step of a warmup does not run at lr_warmup_init.
    run.scheduler.step(increment=1)
    for chained in optimizer.chained_optimizers:
        params = chained.get_parameters()
        if chained.config.clip_grad > 0.0 and params:
            clip_grad_by_total_norm_fp32(
                params, chained.config.clip_grad, grad_norm,
                use_decoupled_grad=chained.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8,
            )
    optimizer.step_with_ready_grads()
    return True, grad_norm


@torch.no_grad()
def eval_batch(run, pairs: List[TokenizedPair], micro_batch_size: int) -> PolicyPassResult:
    """Metric sums (METRIC_SUMS + pair count) of one validation batch, unreduced,
    and the per-pair (chosen, rejected) rewards of each micro-batch (last stage)."""
    microbatches = device_microbatches(pairs, micro_batch_size, run.pad_id, run.cfg.data)
    return _policy_pass(run, microbatches, nullcontext, forward_only=True)
