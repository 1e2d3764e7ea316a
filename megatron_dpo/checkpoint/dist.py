"""Policy + optimizer state as megatron-core distributed checkpoints.

Saved tensors are keyed by global names and offsets, so a checkpoint written
at one TP/PP/VPP layout loads into any other (reshard on load). This is the
``policy/`` directory of a step directory (checkpoint/files.py).
"""

from typing import Dict, List, Optional, Set

import torch

from megatron_dpo.config.errors import ConfigError
from megatron_dpo.models.lora import has_adapters

# checkpointing.optimizer_format: megatron's distrib_optim_sharding_type, saved
# in the checkpoint's content metadata (no metadata fails to save, DESIGN.md).
SHARDING_KEY = "distrib_optim_sharding_type"
OPTIMIZER_FORMATS = ("dp_reshardable", "fully_reshardable")
# Transformer Engine's and megatron's local layer specs write the same keys
# except for modules' extra state (TE's FP8 metadata; Megatron-LM PR 6270):
# loading across specs tolerates these, and nothing else.
EXTRA_STATE = "._extra_state"
# An MoE model's optimizer chains two megatron optimizers (dense, expert
# parameters); megatron prefixes their state keys with chained_<i>. unless
# told not to (as Megatron-LM's training does for new checkpoints), and then
# a checkpoint cannot be loaded where the chain has another length (EP1 vs
# EP2). Without the prefix, fully_reshardable state loads at any EP size;
# dp_reshardable state keeps its prefix (megatron adds it regardless).
AVOID_PREFIX_KEY = "chained_optim_avoid_prefix"


def checkpoint_errors() -> tuple:
    """What dist_checkpointing raises for a failed save or load: its own
    CheckpointingException and torch DCP's CheckpointException (a
    BaseException: ``except Exception`` misses it), which wrap each failed
    rank's error."""
    from megatron.core.dist_checkpointing.core import CheckpointingException
    from torch.distributed.checkpoint.api import CheckpointException

    return CheckpointingException, CheckpointException


def _unwrap_ddp(chunk: torch.nn.Module) -> torch.nn.Module:
    from megatron.core.distributed import DistributedDataParallel

    return chunk.module if isinstance(chunk, DistributedDataParallel) else chunk


def _chunk_state(chunk: torch.nn.Module) -> dict:
    """A chunk's sharded state; a LoRA policy's is its adapters only (the
    frozen base is read from the source: checkpoint/files.py names it)."""
    state = _unwrap_ddp(chunk).sharded_state_dict()
    if has_adapters(chunk):
        state = {key: value for key, value in state.items() if ".lora." in key}
    return state


def model_sharded_state_dict(chunks: List[torch.nn.Module]) -> Dict[str, dict]:
    if len(chunks) == 1:
        return {"model": _chunk_state(chunks[0])}
    return {f"model{i}": _chunk_state(chunk) for i, chunk in enumerate(chunks)}


def is_extra_state(key: str) -> bool:
    """A module's ``_extra_state`` (TE's FP8 metadata), also as one shard of a
    sharded key (``...._extra_state/shard_0_4``)."""
    return key.split("/", 1)[0].endswith(EXTRA_STATE)


def _load_into(chunk: torch.nn.Module, state: dict) -> None:
    """Load a chunk's loaded state; an ``_extra_state`` the checkpoint lacks
    (written with the other layer spec) keeps the module's own, empty one."""
    result = _unwrap_ddp(chunk).load_state_dict(state, strict=False)
    missing = [key for key in result.missing_keys if not is_extra_state(key)
               and (".lora." in key or not has_adapters(chunk))]
    assert not missing and not result.unexpected_keys, (missing, result.unexpected_keys)


def finish_param_sync(chunks: List[torch.nn.Module]) -> None:
    """Collective. With ``overlap_param_gather`` the optimizer step leaves the
    other DP ranks' parameter shards to the next forward's pre-hooks: gather
    them now (as megatron's training loop does before a save)."""
    for chunk in chunks:
        if getattr(chunk, "use_forward_hook", False):
            chunk.disable_forward_pre_hook(param_sync=True)
            chunk.enable_forward_pre_hook()


def _data_parallel_group():
    from megatron.core import parallel_state

    return parallel_state.get_data_parallel_group(with_context_parallel=True)


def save_policy(chunks: List[torch.nn.Module], optimizer, directory: str,
                optimizer_format: str = "dp_reshardable", async_queue=None) -> None:
    """Collective: every rank writes its shards of model and optimizer state.
    Fully parallel, as Megatron-LM's ``--ckpt-fully-parallel-save``: a tensor
    replicated over the data-parallel group is written once, by one DP rank,
    the writes spread evenly over them. A failed write raises only after
    the save's collectives (parallel/compat.py: the writes rank 0 makes
    alone), so that the caller can tell every rank.

    ``async_queue``: a megatron-core ``AsyncCallsQueue``; the shards are then
    written by a forked process (a copy-on-write snapshot of this moment's
    tensors; on GPU they are first copied to host memory) and the directory
    is complete only after ``finish_async_saves``."""
    from megatron.core import dist_checkpointing

    from megatron_dpo.parallel import compat

    finish_param_sync(chunks)
    metadata = {SHARDING_KEY: optimizer_format, AVOID_PREFIX_KEY: True}
    state = model_sharded_state_dict(chunks)
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(state, metadata=metadata)
    with compat.single_rank_write_errors_deferred():
        request = dist_checkpointing.save(state, directory, sharded_strategy=_save_strategy(),
                                          content_metadata=metadata, async_sharded_save=async_queue is not None)
    if async_queue is not None:
        async_queue.schedule_async_request(request)


def async_calls_queue():
    """megatron-core's queue of async saves (a forked writer per save)."""
    from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

    return AsyncCallsQueue()


def finish_async_saves(async_queue) -> None:
    """Collective: wait for the queue's saves and finalize them (each rank's
    write results gathered, DCP's .metadata and metadata.json written); a
    failure on any rank raises on every rank, as for a synchronous save."""
    from megatron_dpo.parallel import compat

    with compat.single_rank_write_errors_deferred():
        async_queue.maybe_finalize_async_calls(blocking=True)


def _save_strategy():
    from megatron.core.dist_checkpointing.serialization import get_default_save_sharded_strategy
    from megatron.core.dist_checkpointing.strategies.fully_parallel import FullyParallelSaveStrategyWrapper

    return FullyParallelSaveStrategyWrapper(get_default_save_sharded_strategy(), _data_parallel_group())


def saved_optimizer_format(directory: str) -> str:
    """The optimizer format a policy directory was written in (checkpoints
    from before checkpointing.optimizer_format are fully_reshardable)."""
    from megatron.core import dist_checkpointing

    return (dist_checkpointing.load_content_metadata(directory) or {}).get(SHARDING_KEY, "fully_reshardable")


def _load(request: dict, directory: str) -> dict:
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.serialization import get_default_load_sharded_strategy
    from megatron.core.dist_checkpointing.strategies.fully_parallel import FullyParallelLoadStrategyWrapper
    from megatron.core.dist_checkpointing.validation import StrictHandling

    strategy = FullyParallelLoadStrategyWrapper(get_default_load_sharded_strategy(directory), _data_parallel_group())
    loaded, missing, unexpected = dist_checkpointing.load(request, directory, sharded_strategy=strategy,
                                                          strict=StrictHandling.RETURN_ALL)
    everyones_unexpected = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(everyones_unexpected, sorted(unexpected))  # differ by rank
    problem = key_mismatch(missing, set().union(*everyones_unexpected), loads_optimizer="optimizer" in request,
                           adapters_only=_adapters_only(request))
    if problem:
        from megatron.core.dist_checkpointing.core import CheckpointingException

        raise CheckpointingException(f"{directory}: {problem}")
    return loaded


def _adapters_only(request: dict) -> bool:
    model_keys = [key for name, state in request.items() if name != "optimizer" for key in state]
    return bool(model_keys) and all(".lora." in key for key in model_keys)


def key_mismatch(missing: Set[str], unexpected: Set[str], loads_optimizer: bool, adapters_only: bool) -> Optional[str]:
    """What is wrong with the keys of a load, or None. ``missing``: in the
    checkpoint but not requested; ``unexpected``: requested but not in the
    checkpoint (dist_checkpointing's StrictHandling.RETURN_ALL names).
    ``_extra_state`` keys on one side only are fine (the other layer spec),
    and so are the checkpoint's optimizer state when only weights are loaded
    and its base weights when only LoRA adapters are."""
    def matters(key: str) -> bool:
        if is_extra_state(key):
            return False
        if key.startswith("optimizer."):
            return loads_optimizer
        return ".lora." in key or not adapters_only

    missing, unexpected = sorted(filter(matters, missing)), sorted(filter(matters, unexpected))
    parts = []
    if unexpected:
        parts.append(f"{len(unexpected)} key(s) this model has are not in the checkpoint: {_shown(unexpected)}")
    if missing:
        parts.append(f"{len(missing)} key(s) of the checkpoint have no place in this model: {_shown(missing)}")
    if not parts:
        return None
    return ("; ".join(parts) + ". The checkpoint was written for another model or layer layout (only "
            "_extra_state keys may differ, between Transformer Engine's and the local layer spec).")


def _shown(keys: List[str]) -> str:
    return ", ".join(keys[:8]) + (f" and {len(keys) - 8} more" if len(keys) > 8 else "")


def load_model_weights(chunks: List[torch.nn.Module], directory: str) -> None:
    """Collective: load policy weights (no optimizer state) into this layout."""
    request = model_sharded_state_dict(chunks)
    loaded = _load(request, directory)
    for key, chunk in zip(request, chunks):
        _load_into(chunk, loaded[key])


def load_policy(chunks: List[torch.nn.Module], optimizer, directory: str) -> None:
    """Collective: load policy weights and optimizer state into this layout
    (any TP/PP/DP for fully_reshardable optimizer state; the saved TP/PP/VPP
    for dp_reshardable, which train/resume.py checks first)."""
    from megatron.core import dist_checkpointing

    saved = dist_checkpointing.load_content_metadata(directory) or {}
    metadata = {SHARDING_KEY: saved_optimizer_format(directory), AVOID_PREFIX_KEY: saved.get(AVOID_PREFIX_KEY, False)}
    # One megatron optimizer for a dense GPT model; an MoE model's expert
    # parameters (their own DP group) get a second one.
    inners = optimizer.chained_optimizers
    torch_adams = [_distributed_torch_adam(inner) for inner in inners]
    for torch_adam in torch_adams:
        if torch_adam is not None:
            _init_adam_state(torch_adam)
    model_state = model_sharded_state_dict(chunks)
    request = dict(model_state)
    request["optimizer"] = optimizer.sharded_state_dict(model_state, is_loading=True, metadata=metadata)
    loaded = _load(request, directory)
    for key, chunk in zip(model_state, chunks):
        _load_into(chunk, loaded[key])
    if all(torch_adam is None for torch_adam in torch_adams):
        optimizer.load_state_dict(_for_this_chain(loaded["optimizer"], inners))
        return
    if _other_chain_entry(loaded["optimizer"], inners) is not None:
        raise ConfigError(
            f"cannot resume from {directory} with the distributed optimizer at this expert parallel size: "
            "megatron-core 0.16.1 gives MoE experts their own optimizer only with "
            "expert_model_parallel_size > 1, and the distributed optimizer's state does not carry across that "
            "change. Resume with policy.megatron_cfg.expert_model_parallel_size on the saved side of 1 (1, or "
            "any size > 1), or with policy.megatron_cfg.optimizer.use_distributed_optimizer=false."
        )
    # ChainedOptimizer.sharded_state_dict: one optimizer's dict, or {index: dict} for several.
    states = [loaded["optimizer"]] if len(inners) == 1 else [loaded["optimizer"][i] for i in range(len(inners))]
    for inner, torch_adam, state in zip(inners, torch_adams, states):
        if torch_adam is None:
            inner.load_state_dict(state)
        else:
            _load_distributed_adam_state(inner, torch_adam, state)


def _for_this_chain(state: dict, inners) -> dict:
    """The loaded optimizer state in the shape of this run's chain of megatron
    optimizers. megatron-core 0.16.1 gives MoE experts their own optimizer
    only with expert parallelism (their params are ``allreduce=False`` only
    for EP > 1), so a checkpoint of EP2 holds two chained entries
    ({0: ..., 1: ...} in common.pt) and one of EP1 a single one. The Adam
    moments are keyed by parameter name (no chained_<i>. prefix,
    ``AVOID_PREFIX_KEY``) and load into either chain as requested; what
    common.pt keeps per entry, the param groups' settings and the common step
    count, is re-keyed here: the settings are this run's (the LR scheduler,
    restored separately, sets lr and weight decay every step), the step count
    the saved one (every entry of a chain holds the same)."""
    saved = _other_chain_entry(state, inners)
    if saved is None:
        return state  # saved with this chain's shape
    saved_step = _torch_state(saved)["state"].get("common_step")
    entries = [state] if len(inners) == 1 else [state[index] for index in range(len(inners))]
    for inner, entry in zip(inners, entries):
        torch_state = _torch_state(entry)
        if saved_step is not None:
            torch_state["state"]["common_step"] = saved_step
        groups = inner.optimizer.param_groups
        torch_state["param_groups"] = [dict({k: v for k, v in group.items() if k != "params"}, params=loaded["params"])
                                       for group, loaded in zip(groups, torch_state["param_groups"], strict=True)]
    return {key: value for key, value in state.items() if not isinstance(key, int)} if len(inners) == 1 else \
        {index: state[index] for index in range(len(inners))}


def _other_chain_entry(state: dict, inners) -> Optional[dict]:
    """An entry common.pt wrote for a chain of another length (it sits beside
    this run's request in the loaded state), or None when the lengths agree."""
    chained_keys = sorted(key for key in state if isinstance(key, int))
    if len(inners) == 1 and chained_keys:
        return state[chained_keys[0]]
    if len(inners) > 1 and "param_groups" in state:
        return state
    return None


def _torch_state(entry: dict) -> dict:
    """A megatron optimizer's state dict -> its torch optimizer's (bf16 nests it under "optimizer")."""
    return entry.get("optimizer", entry)


# megatron-core 0.16.1's DistributedOptimizer on plain torch Adam (no TE/apex
# FusedAdam) cannot load its own checkpoint: (1) state_dict() asserts one
# common per-param "step" (`assert len(steps) == 1`), which a fresh optimizer
# without state lacks; (2) load_state_dict() puts "step" into every param's
# state, then load_parameter_state_from_fully_reshardable() (or, for
# dp_reshardable, _set_main_param_and_optimizer_states()) copies each state
# key from the checkpoint, which has no per-param "step" (KeyError); (3) every
# param gets the *same* step tensor, so each Adam step advances it once per
# param and the bias correction goes wrong (resumed loss off by 4e-3 to 7e-2;
# tests/e2e/test_resume.py, which runs this path, then fails).
# Our load path: zero state before the request, then the param state loaded
# with "step" set aside, then each param its own copy of the step.
def _distributed_torch_adam(inner) -> Optional[torch.optim.Optimizer]:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    if isinstance(inner, DistributedOptimizer) and isinstance(inner.optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        return inner.optimizer
    return None


def _init_adam_state(adam: torch.optim.Optimizer) -> None:
    for group in adam.param_groups:
        for param in group["params"]:
            if not adam.state[param]:
                adam.state[param].update(
                    step=torch.tensor(0.0), exp_avg=torch.zeros_like(param), exp_avg_sq=torch.zeros_like(param)
                )


def _load_distributed_adam_state(inner, adam: torch.optim.Optimizer, state: dict) -> None:
    param_state = state.pop("param_state")
    sharding_type = state.pop("param_state_sharding_type")
    assert sharding_type in OPTIMIZER_FORMATS, sharding_type
    inner.load_state_dict(state)  # param groups, and the step of every param
    steps = {param: param_state_dict.pop("step") for param, param_state_dict in adam.state.items()}
    if sharding_type == "fully_reshardable":
        inner.load_parameter_state_from_fully_reshardable(param_state)
    else:
        with torch.no_grad():  # it copies into fp32 params that require grad
            inner.load_parameter_state_from_dp_reshardable(param_state)
    for param, step in steps.items():
        adam.state[param]["step"] = step.clone()
