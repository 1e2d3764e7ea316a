"""Process groups: the one place that starts torch.distributed and megatron-core's
``parallel_state``, and the one place that picks the device and backend.

Everything downstream receives the run's ``ParallelDims`` (sizes, ranks,
groups; parallel/dims.py) instead of reading globals; megatron-core's own
schedules still consult its ``parallel_state`` globals, which ``init_parallel``
sets up.
"""

import datetime
import os
import socket
import torch
import torch.distributed as dist

from megatron_dpo.parallel import compat
from megatron_dpo.parallel.dims import ParallelDims


def device_type(cuda_available: bool, for_conversion: bool = False) -> str:
    """"cuda" where a rank trains on a GPU node, else "cpu". Conversion (HF <->
    megatron) moves weights and computes nothing: it builds on the CPU whatever
    the node has, so a 70B model is never put on one GPU."""
    return "cuda" if cuda_available and not for_conversion else "cpu"


def get_device(for_conversion: bool = False) -> torch.device:
    """The device this rank computes on (``for_conversion``: builds a model
    to convert on). Nothing else in the project names one."""
    if device_type(compat.cuda_available(), for_conversion) == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def backend() -> str:
    return "nccl" if compat.cuda_available() else "gloo"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_distributed(timeout_minutes: int = 30) -> None:
    """Start torch.distributed from torchrun's env, or as a world of one."""
    compat.apply()
    if dist.is_initialized():
        return
    if "RANK" not in os.environ:  # plain `python script.py`: a world of size 1
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    if compat.cuda_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(
        backend=backend(), timeout=datetime.timedelta(minutes=timeout_minutes)
    )


def init_parallel(dims: ParallelDims, seed: int) -> ParallelDims:
    """Create megatron-core's TP/PP/DP groups for ``dims``' sizes and seed every
    rank's RNG streams; returns ``dims`` with this rank's ranks and groups."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    init_distributed()
    if dist.get_world_size() != dims.world_size:
        raise ValueError(f"{dims.describe()} does not match the world size {dist.get_world_size()}")
    # Already set up with these sizes: keep the groups, which models built
    # before still use (scripts/benchmark.py holds several runs at once).
    if not _initialized_as(dims):
        if parallel_state.model_parallel_is_initialized():
            parallel_state.destroy_model_parallel()
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=dims.tp_size,
            pipeline_model_parallel_size=dims.pp_size,
            virtual_pipeline_model_parallel_size=dims.vpp_size,
            expert_model_parallel_size=dims.ep_size,
            expert_tensor_parallel_size=dims.etp_size,
        )
    # Same default stream on every rank (replicated weights and data order
    # agree), a TP-rank-specific one inside megatron's RNG tracker.
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)
    assert parallel_state.get_data_parallel_world_size() == dims.dp_size
    return dims.with_ranks(
        rank=dist.get_rank(),
        tp_rank=parallel_state.get_tensor_model_parallel_rank(),
        pp_rank=parallel_state.get_pipeline_model_parallel_rank(),
        dp_rank=parallel_state.get_data_parallel_rank(),
        ep_rank=parallel_state.get_expert_model_parallel_rank(),
        etp_rank=parallel_state.get_expert_tensor_parallel_rank(),
        dp_group=parallel_state.get_data_parallel_group(),
        tp_group=parallel_state.get_tensor_model_parallel_group(),
        pp_group=parallel_state.get_pipeline_model_parallel_group(),
    )


def _initialized_as(dims: ParallelDims) -> bool:
    from megatron.core import parallel_state

    return (parallel_state.model_parallel_is_initialized()
            and parallel_state.get_tensor_model_parallel_world_size() == dims.tp_size
            and parallel_state.get_pipeline_model_parallel_world_size() == dims.pp_size
            and parallel_state.get_virtual_pipeline_model_parallel_world_size() == dims.vpp_size
            and parallel_state.get_expert_model_parallel_world_size() == dims.ep_size
            and parallel_state.get_expert_tensor_parallel_world_size() == dims.etp_size)


def shutdown() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
