"""Validation: the DPO metrics of the policy on held-out pairs (no updates)."""

from functools import partial
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

from megatron_dpo.data import PairSampler
from megatron_dpo.parallel.init import get_device
from megatron_dpo.train.step import eval_batch, num_real_tokens, reduce_metrics


def _sample_rewards(run, microbatches_rewards: List[torch.Tensor], num_samples: int) -> Optional[torch.Tensor]:
    """The first pairs' (chosen, rejected) rewards, moved from the last stage to
    every stage (rank 0 prints them)."""
    rewards = torch.zeros(num_samples, 2, dtype=torch.float64)
    if run.dims.is_last_stage and microbatches_rewards:
        available = torch.cat(microbatches_rewards)[:num_samples].double().cpu()
        rewards[: available.shape[0]] = available
    rewards = rewards.to(get_device())
    dist.all_reduce(rewards, group=run.dims.pp_group)
    return rewards.cpu()


def _texts(tokenizer, pair) -> dict:
    decode = partial(tokenizer.decode, skip_special_tokens=True)
    return {
        "prompt": decode(pair.chosen_ids[: pair.chosen_prompt_len]),
        "chosen": decode(pair.chosen_ids[pair.chosen_prompt_len:]),
        "rejected": decode(pair.rejected_ids[pair.rejected_prompt_len:]),
    }


def validate(run, split: str, num_samples: int = 0) -> Tuple[Dict[str, float], List[dict]]:
    """Metrics of the validation set ``split`` ("val", "val/<name>") over
    ``dpo.val_batches`` global batches (all when None), and ``num_samples``
    printable pairs with their rewards (on DP rank 0)."""
    dpo = run.cfg.dpo
    pairs = run.val_data[split].pairs
    sampler = PairSampler(len(pairs), dpo.val_global_batch_size, run.dims.dp_rank, run.dims.dp_size,
                          shuffle=False, seed=dpo.seed)
    total_sums, num_tokens, samples = None, 0, []
    for batch_index, indices in enumerate(sampler):
        if dpo.val_batches is not None and batch_index >= dpo.val_batches:
            break
        batch_pairs = [pairs[i] for i in indices]
        result = eval_batch(run, batch_pairs, dpo.val_micro_batch_size)
        total_sums = result.sums if total_sums is None else total_sums + result.sums
        num_tokens += num_real_tokens(batch_pairs)
        if batch_index == 0 and num_samples > 0:
            count = min(num_samples, len(indices))
            sample_rewards = _sample_rewards(run, result.rewards, count)
            samples = [
                dict(_texts(run.tokenizer, pairs[i]), chosen_reward=float(r[0]), rejected_reward=float(r[1]))
                for i, r in zip(indices[:count], sample_rewards)
            ]
    metrics = reduce_metrics(total_sums, num_tokens, run.dims)
    return metrics, samples
