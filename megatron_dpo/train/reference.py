"""Where each pair's reference log-probs come from, by ``reference.mode``.

- ``online``: a frozen reference model of the policy's layout lives beside it;
  ``schedule.reference_pass`` runs it on every step's micro-batches.
- ``cached``: no reference model while training. Before the policy is built,
  every data set whose cache (reference_cache.py) is missing or stale is run
  through the reference forward-only, once; the reference is then freed, so
  its parameters never share memory with the policy's. The log-probs are
  attached to the pairs (``TokenizedPair.reference_logps``) and collate puts
  them into each micro-batch.
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
from typing import Callable, Dict, List

import torch
import torch.distributed as dist

from megatron_dpo.config.schema import Config, DataConfig
from megatron_dpo.config.validate import ParallelLayout
from megatron_dpo.data import TokenizeResult, split_paths
from megatron_dpo.models.source import ModelSource
from megatron_dpo.parallel.init import ParallelContext, get_device
from megatron_dpo.parallel.schedule import reference_pass
from megatron_dpo.train import reference_cache
from megatron_dpo.train.step import device_microbatches, sum_last_stage_shares

logger = logging.getLogger(__name__)

BuildReference = Callable[[], List[torch.nn.Module]]


def prepare_reference(cfg: Config, source: ModelSource, ctx: ParallelContext, layout: ParallelLayout,
                      pad_id: int, datasets: Dict[str, TokenizeResult],
                      build_reference: BuildReference) -> List[torch.nn.Module]:
    """The reference model chunks to keep for training ([] unless online);
    for cached / none, every pair of ``datasets`` gets its reference_logps."""
    mode = cfg.reference.mode
    if mode == "online":
        return build_reference()
    if mode == "cached":
        logps = build_caches(cfg, source, ctx, layout, pad_id, datasets, build_reference)
    else:  # none: reference-free
        logps = {name: torch.zeros(len(data.pairs), 2) for name, data in datasets.items()}
    for name, data in datasets.items():
        attach_reference_logps(data, logps[name])
    return []


def attach_reference_logps(data: TokenizeResult, logps: torch.Tensor) -> None:
    """logps [num_pairs, 2] (chosen, rejected) -> each pair's reference_logps."""
    for pair, (chosen, rejected) in zip(data.pairs, logps.tolist()):
        pair.reference_logps = (chosen, rejected)


def build_caches(cfg: Config, source: ModelSource, ctx: ParallelContext, layout: ParallelLayout,
                 pad_id: int, datasets: Dict[str, TokenizeResult],
                 build_reference: BuildReference) -> Dict[str, torch.Tensor]:
    """Load or compute the cached reference log-probs of each data set.
    Collective: every rank calls it with the same data sets."""
    root = reference_cache.cache_root(cfg)
    model = reference_cache.model_identity(source, cfg.dpo.seed)
    found, missing = {}, {}
    for name, data in datasets.items():
        key, identity = reference_cache.cache_identity(data.pairs, model, cfg.policy.precision)
        logps, why_not = reference_cache.load_cache(f"{root}/{key}", identity)
        if _on_every_rank(logps is not None):
            found[name] = logps
            logger.info("reference cache for %s: loaded %s/%s", name, root, key)
        else:
            missing[name] = (key, identity)
            logger.info("reference cache for %s: %s at %s/%s; computing it", name, why_not, root, key)
    if missing:
        found.update(_compute_and_store(cfg, ctx, layout, source.arch.vocab_size, pad_id, datasets, missing,
                                        build_reference))
    return found


def _on_every_rank(flag: bool) -> bool:
    """True only when ``flag`` holds on all ranks (e.g. a cache not on every node's disk)."""
    value = torch.tensor([int(flag)], device=get_device())
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item())


def _compute_and_store(cfg, ctx, layout, vocab_size, pad_id, datasets, missing,
                       build_reference) -> Dict[str, torch.Tensor]:
    start = time.perf_counter()
    reference = build_reference()
    computed, paths = {}, split_paths(cfg.data)
    for name, (key, identity) in missing.items():
        logps = compute_reference_logps(reference, datasets[name], ctx, cfg.policy.train_micro_batch_size,
                                        layout.num_microbatches, vocab_size, pad_id, cfg.data)
        if ctx.is_rank0:
            reference_cache.save_cache(f"{reference_cache.cache_root(cfg)}/{key}", identity, logps, paths[name])
        computed[name] = logps
    dist.barrier()
    del reference
    gc.collect()
    torch.cuda.empty_cache()
    logger.info("reference log-probs of %s computed in %.1f s; reference model freed",
                ", ".join(missing), time.perf_counter() - start)
    return computed


@torch.no_grad()
def compute_reference_logps(reference: List[torch.nn.Module], data: TokenizeResult, ctx: ParallelContext,
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
    indices = list(range(ctx.dp_rank, len(pairs), ctx.dp_size))
    per_call = micro_batch_size * num_microbatches
    for start in range(0, len(indices), per_call):
        chunk = indices[start:start + per_call]
        call_pairs = [pairs[i] for i in chunk + [chunk[-1]] * (per_call - len(chunk))]
        microbatches = device_microbatches(call_pairs, micro_batch_size, pad_id, data_cfg)
        reference_pass(reference, microbatches, microbatches[0]["tokens"].shape[1], vocab_size)
        if ctx.is_last_stage:
            call_logps = torch.cat([batch["reference_logps"] for batch in microbatches]).view(-1, 2)
            logps[chunk] = call_logps[:len(chunk)].float().cpu()
    # Each pair was filled on one DP rank's last stage, zeros elsewhere: the sum is an exact copy.
    return sum_last_stage_shares(logps, ctx)
