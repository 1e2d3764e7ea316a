"""Where each pair's reference log-probs come from, by ``reference.mode``.

- ``online``: a frozen reference model of the policy's layout lives beside it;
  ``schedule.reference_pass`` runs it on every step's micro-batches.
- ``cached``: no reference model while training. Before the first step,
  every data set whose cache (reference_cache.py) is missing or stale is run
  forward-only through the reference weights, once (train/setup.py decides
  which model holds them: the freshly loaded policy, or a reference built
  from the source and freed afterwards). The data set carries the log-probs
  (``set_reference_logps``), each pair its own, and collate puts them into
  each micro-batch.
- ``none``: reference-free; every reference log-prob is 0.

Cached and online log-probs of a sequence agree up to float rounding, not
bit for bit: both are sums over the same completion tokens with right padding
under a causal mask, but the cache pass groups sequences into other
micro-batches, padded to other lengths, so kernels reduce in another order.
The cache holds per-sequence log-probs, so it serves padded and packed
batches alike (data.packing / data.prefix_sharing change them by rounding only).
"""

import gc
import logging
import time
from typing import Dict, List, Tuple

import torch
import torch.distributed as dist

from megatron_dpo.checkpoint.source import ModelSource
from megatron_dpo.config.schema import Config, DataConfig
from megatron_dpo.data import TokenizeResult
from megatron_dpo.parallel import compat
from megatron_dpo.parallel.dims import ParallelDims
from megatron_dpo.parallel.init import get_device
from megatron_dpo.train import reference_cache
from megatron_dpo.train.schedule import reference_pass
from megatron_dpo.train.step import device_microbatches, sum_last_stage_shares

logger = logging.getLogger(__name__)

# Data set name -> (cache key, cache identity) of a cache to compute.
Missing = Dict[str, Tuple[str, dict]]


def load_caches(cfg: Config, source: ModelSource,
                datasets: Dict[str, TokenizeResult]) -> Tuple[Dict[str, torch.Tensor], Missing]:
    """(log-probs of each data set whose cache is valid on every rank, the
    caches still to compute). Collective: every rank calls it with the same data sets."""
    root = reference_cache.cache_root(cfg)
    model = reference_cache.model_identity(source, cfg.dpo.seed)
    lora_cfg = cfg.policy.lora_cfg
    if lora_cfg.enabled and lora_cfg.init_adapter_path is not None:  # the reference is base + this adapter
        model = dict(model, initial_adapter=reference_cache.directory_identity(lora_cfg.init_adapter_path))
    found, missing = {}, {}
    for name, data in datasets.items():
        key, identity = reference_cache.cache_identity(data, model, cfg.policy.precision)
        logps, why_not = reference_cache.load_cache(f"{root}/{key}", identity)
        if _on_every_rank(logps is not None):
            found[name] = logps
            logger.info("reference cache for %s: loaded %s/%s", name, root, key)
        else:
            missing[name] = (key, identity)
            logger.info("reference cache for %s: %s at %s/%s; computing it", name, why_not, root, key)
    return found, missing


def _on_every_rank(flag: bool) -> bool:
    """True only when ``flag`` holds on all ranks (e.g. a cache not on every node's disk)."""
    value = torch.tensor([int(flag)], device=get_device())
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item())


def compute_caches(cfg: Config, dims: ParallelDims, vocab_size: int, pad_id: int,
                   datasets: Dict[str, TokenizeResult], missing: Missing, paths: Dict[str, str],
                   model: List[torch.nn.Module]) -> Dict[str, torch.Tensor]:
    """Run ``model`` (the reference weights) over each missing data set, store
    the caches (rank 0) and return the log-probs. Collective."""
    start = time.perf_counter()
    computed = {}
    was_training = [chunk.training for chunk in model]
    for chunk in model:
        chunk.eval()
    for name, (key, identity) in missing.items():
        logps = compute_reference_logps(model, datasets[name], dims, cfg.policy.train_micro_batch_size,
                                        dims.num_microbatches, vocab_size, pad_id, cfg.data)
        if dims.is_rank0:
            reference_cache.save_cache(f"{reference_cache.cache_root(cfg)}/{key}", identity, logps, paths[name])
        computed[name] = logps
    for chunk, training in zip(model, was_training):
        chunk.train(training)
    dist.barrier()
    logger.info("reference log-probs of %s computed in %.1f s", ", ".join(missing), time.perf_counter() - start)
    return computed


def free_memory() -> None:
    """Return a freed model's memory (host, and the device's cache on GPU)."""
    gc.collect()
    if compat.cuda_available():
        torch.cuda.empty_cache()


@torch.no_grad()
def compute_reference_logps(reference: List[torch.nn.Module], data: TokenizeResult, dims: ParallelDims,
                            micro_batch_size: int, num_microbatches: int, vocab_size: int,
                            pad_id: int, data_cfg: DataConfig) -> torch.Tensor:
    """[num_pairs, 2] (chosen, rejected) summed completion log-probs, on every rank.

    DP rank r takes pairs r, r + dp, ...; each schedule call runs
    ``num_microbatches`` micro-batches of ``micro_batch_size`` pairs (the
    training shape, valid for this layout, padded or packed as in training),
    the last one filled up with repeats whose results are dropped.
    """
    pairs = data.pairs
    logps = torch.zeros(len(pairs), 2)  # [N, 2]
    indices = list(range(dims.dp_rank, len(pairs), dims.dp_size))
    per_call = micro_batch_size * num_microbatches
    for start in range(0, len(indices), per_call):
        chunk = indices[start:start + per_call]
        call_pairs = [pairs[i] for i in chunk + [chunk[-1]] * (per_call - len(chunk))]
        microbatches = device_microbatches(call_pairs, micro_batch_size, pad_id, data_cfg)
        microbatch_logps = reference_pass(reference, microbatches, microbatches[0]["tokens"].shape[1], vocab_size)
        if dims.is_last_stage:
            call_logps = torch.cat(microbatch_logps).view(-1, 2)
            logps[chunk] = call_logps[:len(chunk)].float().cpu()
    # Each pair was filled on one DP rank's last stage, zeros elsewhere: the sum is an exact copy.
    return sum_last_stage_shares(logps, dims)
