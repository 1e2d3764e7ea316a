"""The one place that adapts megatron-core to this project's needs.

megatron-core 0.16.1 assumes CUDA throughout: it allocates with
``device="cuda"`` or ``torch.cuda.current_device()``, calls ``tensor.cuda()``,
seeds and swaps the CUDA RNG, and checks ``param.type() ==
"torch.cuda.FloatTensor"``. On a machine without CUDA (CI, laptops) these
are redirected to the CPU so that megatron-core's own model, schedules, DDP,
optimizer and dist_checkpointing run unchanged on gloo. Nothing is redirected
when CUDA is present: on GPU this module only applies the bug fixes that hit
GPU users too (each names its upstream reference).

``apply()`` is idempotent and must run before any model is built; the
project's process-group setup (``parallel.init``) calls it. Nowhere else in
the project patches a library.
"""

import copy
import functools
import logging

import torch

SUPPORTED_MEGATRON_CORE = "0.16.1"

# Tensor factories megatron-core calls with a CUDA device on its way through
# model build, schedules, p2p, DDP buffers, optimizer and grad clipping.
_FACTORIES = (
    "empty", "zeros", "ones", "full", "tensor", "as_tensor", "arange", "rand",
    "randn", "randint", "randperm", "linspace", "eye", "empty_strided",
    "empty_like", "zeros_like", "ones_like", "full_like", "rand_like", "randn_like",
)

_applied = False


def cuda_available() -> bool:
    return torch.cuda.is_available()


def _is_cuda_device(device) -> bool:
    if isinstance(device, bool):
        return False
    if isinstance(device, int):
        return True  # a device index, as from torch.cuda.current_device()
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, torch.device) and device.type == "cuda"


def _redirect_device_kwarg(factory):
    @functools.wraps(factory)
    def wrapper(*args, **kwargs):
        if _is_cuda_device(kwargs.get("device")):
            kwargs["device"] = "cpu"
        return factory(*args, **kwargs)

    return wrapper


def _tensor_to(original):
    @functools.wraps(original)
    def to(self, *args, **kwargs):
        if args and _is_cuda_device(args[0]):
            args = ("cpu",) + args[1:]
        if _is_cuda_device(kwargs.get("device")):
            kwargs["device"] = "cpu"
        return original(self, *args, **kwargs)

    return to


def _tensor_type(original):
    # The optimizer and grad clipping dispatch on "torch.cuda.FloatTensor" etc.
    @functools.wraps(original)
    def type_(self, *args, **kwargs):
        if args or kwargs:
            return original(self, *args, **kwargs)
        name = original(self)
        return name.replace("torch.", "torch.cuda.", 1) if self.device.type == "cpu" else name

    return type_


def _patch_torch_for_cpu() -> None:
    # `with torch.device(...)` intercepts the factories it cached on first use;
    # fill that cache with the originals, or wrapped factories escape it.
    from torch.utils._device import _device_constructors

    _device_constructors()
    for name in _FACTORIES:
        setattr(torch, name, _redirect_device_kwarg(getattr(torch, name)))
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    torch.Tensor.to = _tensor_to(torch.Tensor.to)
    torch.Tensor.type = _tensor_type(torch.Tensor.type)
    torch.cuda.current_device = lambda: 0
    torch.cuda.synchronize = lambda *args, **kwargs: None
    torch.cuda.empty_cache = lambda: None
    # CUDA RNG -> the CPU generator. megatron's RNG tracker then gives each
    # TP rank its own stream inside fork(), as it does on GPU. manual_seed_all
    # stays untouched: torch.manual_seed calls it, so redirecting it recurses.
    torch.cuda.manual_seed = lambda seed: torch.manual_seed(seed)
    torch.cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    torch.cuda.set_rng_state = lambda state, device="cuda": torch.set_rng_state(state)


def _patch_megatron_for_cpu() -> None:
    from megatron.core.tensor_parallel import random as mcore_random
    from megatron.core.transformer import torch_norm

    mcore_random._get_cuda_rng_state = lambda *args, **kwargs: torch.get_rng_state()
    mcore_random._set_cuda_rng_state = lambda state, *args, **kwargs: torch.set_rng_state(state)
    # fork() warns whenever the CPU RNG moved inside it, which on CPU is by
    # design (the forked CUDA stream *is* the CPU generator here).
    logging.getLogger(mcore_random.__name__).setLevel(logging.ERROR)

    # torch norms refuse sequence_parallel; on CPU the model is built without
    # it and its norm params are tagged so grads are reduced as with SP.
    original_new = torch_norm.WrappedTorchNorm.__new__

    def wrapped_norm_new(cls, config, *args, **kwargs):
        if not config.sequence_parallel:
            return original_new(cls, config, *args, **kwargs)
        config_without_sp = copy.copy(config)
        config_without_sp.sequence_parallel = False
        norm = original_new(cls, config_without_sp, *args, **kwargs)
        for param in norm.parameters():
            param.sequence_parallel = True
        return norm

    torch_norm.WrappedTorchNorm.__new__ = staticmethod(wrapped_norm_new)


def _check_version() -> None:
    from importlib.metadata import version

    found = version("megatron-core")
    if found != SUPPORTED_MEGATRON_CORE:
        raise RuntimeError(
            f"megatron_dpo's CPU compat layer is written for megatron-core=={SUPPORTED_MEGATRON_CORE}, "
            f"found {found}. Install the pinned version (pip install megatron-core=="
            f"{SUPPORTED_MEGATRON_CORE}) or re-verify megatron_dpo/parallel/compat.py against it."
        )


# Blocking torch.distributed calls the benchmark times (scripts/benchmark.py).
# isend / irecv stay unwrapped: P2POp accepts only the originals.
TIMED_COLLECTIVES = (
    "all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_object", "reduce_scatter",
    "reduce_scatter_tensor", "broadcast", "broadcast_object_list", "all_to_all_single", "barrier",
    "send", "recv", "batch_isend_irecv",
)


def instrument_collectives(wrap) -> None:
    """Replace each of ``TIMED_COLLECTIVES`` with ``wrap(original)``.

    Benchmark instrumentation only (training never calls it); it lives here so
    that this module stays the one place that patches a library. Call it before
    megatron-core is imported: some of its modules keep references to these.
    """
    import torch.distributed as dist

    for name in TIMED_COLLECTIVES:
        setattr(dist, name, wrap(getattr(dist, name)))


def apply() -> None:
    """Adapt megatron-core to this machine. Safe to call more than once."""
    global _applied
    if _applied:
        return
    if not cuda_available():
        _check_version()
        _patch_torch_for_cpu()
        _patch_megatron_for_cpu()
    _applied = True
