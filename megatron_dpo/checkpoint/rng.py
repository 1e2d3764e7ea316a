"""Per-rank random number generator states, saved as tensors only.

``rng_rank{R}.pt`` holds the CPU generator, the CUDA generator (on GPU) and
megatron-core's RNG tracker streams (the TP-rank-specific ones used inside
``fork()``). They are read back with ``torch.load(weights_only=True)``: no
pickled objects. The streams belong to a rank of one layout, so they are
restored only when the layout is unchanged.
"""

import torch

from megatron_dpo.checkpoint.files import rng_file
from megatron_dpo.parallel import compat


def save_rng(directory: str, rank: int) -> None:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    state = {"cpu": torch.get_rng_state(), "tracker": get_cuda_rng_tracker().get_states()}
    if compat.cuda_available():
        state["cuda"] = torch.cuda.get_rng_state()
    torch.save(state, rng_file(directory, rank))


def load_rng(directory: str, rank: int) -> None:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    state = torch.load(rng_file(directory, rank), weights_only=True)
    torch.set_rng_state(state["cpu"])
    get_cuda_rng_tracker().set_states(state["tracker"])
    if compat.cuda_available():
        torch.cuda.set_rng_state(state["cuda"])
