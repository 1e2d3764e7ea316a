"""One training step and one validation batch, and their metric reduction."""

import time
from typing import Dict, List

import torch
import torch.distributed as dist

from megatron_dpo.data import TokenizedPair, make_microbatches
from megatron_dpo.parallel.init import ParallelContext, get_device
from megatron_dpo.parallel.schedule import METRIC_SUMS, policy_pass, reference_pass


def to_device(microbatches: List[dict]) -> List[dict]:
    device = get_device()
    return [{key: value.to(device) for key, value in batch.items()} for batch in microbatches]


def num_real_tokens(pairs: List[TokenizedPair]) -> int:
    return sum(len(pair.chosen_ids) + len(pair.rejected_ids) for pair in pairs)


def reduce_metrics(sums: torch.Tensor, num_tokens: int, ctx: ParallelContext) -> Dict[str, float]:
    """Sum the last stage's per-pair sums over PP stages (zeros elsewhere) and DP
    ranks, then divide by the global pair count. Every rank gets the result."""
    values = torch.cat([sums, torch.tensor([float(num_tokens if ctx.is_last_stage else 0)], dtype=torch.float64)])
    values = values.to(get_device())
    dist.all_reduce(values, group=ctx.pp_group)
    dist.all_reduce(values, group=ctx.dp_group)
    values = values.cpu()
    # A TP group's ranks each hold the same sums; they were not reduced over TP.
    num_pairs = values[len(METRIC_SUMS)].item()
    metrics = {name: values[i].item() / num_pairs for i, name in enumerate(METRIC_SUMS)}
    metrics["num_pairs"] = num_pairs
    metrics["num_tokens"] = values[-1].item()
    return metrics


def train_step(run, pairs: List[TokenizedPair]) -> Dict[str, float]:
    """Reference pass, policy forward/backward, optimizer and LR step."""
    start = time.perf_counter()
    microbatches = to_device(make_microbatches(pairs, run.micro_batch_size, run.pad_id))
    seq_length = microbatches[0]["tokens"].shape[1]
    for chunk in run.policy:
        chunk.zero_grad_buffer()
    run.optimizer.zero_grad()
    reference_pass(run.reference, microbatches, seq_length, run.arch.vocab_size)
    sums = policy_pass(run.policy, microbatches, seq_length, run.arch.vocab_size, run.loss_cfg)
    # The schedule's value at this step number (1-based) applies to this step,
    # so the first step of a warmup does not run at lr_warmup_init.
    run.scheduler.step(increment=1)
    lr = run.optimizer.param_groups[0]["lr"]
    _, grad_norm, _ = run.optimizer.step()
    metrics = reduce_metrics(sums, num_real_tokens(pairs), run.ctx)
    step_time = time.perf_counter() - start
    metrics.update(
        grad_norm=float(grad_norm) if grad_norm is not None else float("nan"),
        lr=lr,
        step_time=step_time,
        tokens_per_sec=metrics["num_tokens"] / step_time,
    )
    return metrics


@torch.no_grad()
def eval_batch(run, pairs: List[TokenizedPair], micro_batch_size: int):
    """Metric sums (METRIC_SUMS + pair count) of one validation batch, unreduced,
    and the per-pair (chosen, rejected) rewards of each micro-batch (last stage)."""
    microbatches = to_device(make_microbatches(pairs, micro_batch_size, run.pad_id))
    seq_length = microbatches[0]["tokens"].shape[1]
    reference_pass(run.reference, microbatches, seq_length, run.arch.vocab_size)
    sums = policy_pass(run.policy, microbatches, seq_length, run.arch.vocab_size, run.loss_cfg, forward_only=True)
    rewards = [batch["pair_rewards"] for batch in microbatches if "pair_rewards" in batch]
    return sums, rewards
