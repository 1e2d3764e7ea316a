"""Policy + optimizer state as megatron-core distributed checkpoints.

Saved tensors are keyed by global names and offsets, so a checkpoint written
at one TP/PP/VPP layout loads into any other (reshard on load).

Layout of ``results/dpo/step_N/``::

    policy/            dist_checkpointing dir: {"model"|"model0".., "optimizer"}
    train_state.json   step, epoch, consumed pairs, scheduler state
    rng.pt             per-rank RNG states (tensors only: torch.load weights_only)
    config.yaml        the resolved config of the run
    model_arch.json    the architecture (lets policy.model_name point here)
    tokenizer/         the tokenizer files
"""

from typing import Dict, List

import torch

# dp_reshardable cannot change TP; no metadata fails to save (DESIGN.md).
OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}


def _unwrap_ddp(chunk: torch.nn.Module) -> torch.nn.Module:
    from megatron.core.distributed import DistributedDataParallel

    return chunk.module if isinstance(chunk, DistributedDataParallel) else chunk


def model_sharded_state_dict(chunks: List[torch.nn.Module]) -> Dict[str, dict]:
    if len(chunks) == 1:
        return {"model": _unwrap_ddp(chunks[0]).sharded_state_dict()}
    return {f"model{i}": _unwrap_ddp(chunk).sharded_state_dict() for i, chunk in enumerate(chunks)}


def save_policy(chunks: List[torch.nn.Module], optimizer, directory: str) -> None:
    """Collective: every rank writes its shards of model and optimizer state."""
    from megatron.core import dist_checkpointing

    state = model_sharded_state_dict(chunks)
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(state, metadata=OPTIMIZER_METADATA)
    dist_checkpointing.save(state, directory, content_metadata=OPTIMIZER_METADATA)


def load_model_weights(chunks: List[torch.nn.Module], directory: str) -> None:
    """Collective: load policy weights (no optimizer state) into this layout."""
    from megatron.core import dist_checkpointing

    request = model_sharded_state_dict(chunks)
    loaded = dist_checkpointing.load(request, directory)
    for key, chunk in zip(request, chunks):
        _unwrap_ddp(chunk).load_state_dict(loaded[key])
