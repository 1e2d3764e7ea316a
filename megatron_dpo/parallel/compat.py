"""The one place that adapts megatron-core to this project's needs.

megatron-core 0.16.1 assumes CUDA throughout: it allocates with
``device="cuda"`` or ``torch.cuda.current_device()``, calls ``tensor.cuda()``,
seeds and swaps the CUDA RNG, and checks ``param.type() ==
"torch.cuda.FloatTensor"``. On a machine without CUDA (CI, laptops) these
are redirected to the CPU so that megatron-core's own model, schedules, DDP,
optimizer and dist_checkpointing run unchanged on gloo. Nothing is redirected
when CUDA is present: on GPU this module only applies the bug fixes that hit
GPU users too (each names its upstream reference).

On every machine, GPU included, it also closes the pickle paths by which a
checkpoint directory could run code (see "Safe loading" below).

``apply()`` is idempotent and must run before any model is built; the
project's process-group setup (``parallel.init``) calls it. Nowhere else in
the project patches a library.
"""

import contextlib
import copy
import functools
import importlib.util
import io
import logging
import pickle
import types

import torch

SUPPORTED_MEGATRON_CORE = "0.16.1"

# Tensor factories megatron-core calls with a CUDA device on its way through
# model build, schedules, p2p, DDP buffers, optimizer and grad clipping.
_FACTORIES = (
    "empty", "zeros", "ones", "full", "tensor", "as_tensor", "arange", "rand",
    "randn", "randint", "randperm", "linspace", "eye", "empty_strided",
    "empty_like", "zeros_like", "ones_like", "full_like", "rand_like", "randn_like",
)

_TENSOR_FACTORIES = ("new_empty", "new_zeros", "new_ones", "new_full", "new_tensor")

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
    # tensor.new_empty(..., device=torch.cuda.current_device()): the MoE all-to-all (mappings._AllToAll).
    for name in _TENSOR_FACTORIES:
        setattr(torch.Tensor, name, _redirect_device_kwarg(getattr(torch.Tensor, name)))
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
    # Streams and events: the MoE all-to-all token dispatcher moves its split
    # sizes to the host on a side stream (token_dispatcher.py,
    # MoEAlltoAllTokenDispatcher). On CPU every op is synchronous: one stream.
    torch.cuda.Stream = _CpuStream
    torch.cuda.Event = _CpuEvent
    torch.cuda.current_stream = lambda device=None: _CPU_STREAM
    torch.cuda.stream = lambda stream=None: contextlib.nullcontext()


class _CpuStream:
    """``torch.cuda.Stream`` on CPU: work is synchronous, so waiting is a no-op."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, stream) -> None:
        pass

    def wait_event(self, event) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def record_event(self, event=None):
        return event or _CpuEvent()


class _CpuEvent:
    """``torch.cuda.Event`` on CPU: always complete."""

    def __init__(self, *args, **kwargs):
        pass

    def record(self, stream=None) -> None:
        pass

    def wait(self, stream=None) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True


_CPU_STREAM = _CpuStream()


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

    # The MoE all-to-all dispatcher hands its split sizes to all_to_all_single
    # as numpy arrays, made by moe_utils.maybe_move_tensor_to_cpu(as_numpy=True)
    # only for CUDA tensors; a CPU tensor stays a tensor, which the process
    # group's all_to_all_single refuses. Convert CPU tensors too.
    from megatron.core.transformer.moe import token_dispatcher

    def move_to_host(tensor, as_numpy=False, record_stream=False):
        if torch.is_tensor(tensor) and as_numpy:
            return tensor.numpy()
        return tensor

    token_dispatcher.maybe_move_tensor_to_cpu = move_to_host


def _patch_megatron_fixes() -> None:
    """Bug fixes that hit GPU users too (active everywhere).

    - ``moe_utils.te_general_gemm``: megatron-core 0.16.1 imports it only when
      Transformer Engine is importable, but the router's fp32 GEMM
      (``RouterGatingLinearFunction``, moe_utils.py) tests ``te_general_gemm is
      not None`` unconditionally, so any MoE model without TE raises
      ``NameError`` on its first forward. Upstream defines it as None in the
      ImportError branch on main (NVIDIA/Megatron-LM, megatron/core/transformer/
      moe/moe_utils.py); defining it here does the same.
    """
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


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


# -- Safe loading: no file in a checkpoint directory runs code -----------------
# Where torch 2.13 and megatron-core 0.16.1 unpickle what a checkpoint holds:
# 1. torch DCP reads ``.metadata`` with plain ``pickle.load``
#    (torch/distributed/checkpoint/filesystem.py, FileSystemReader.read_metadata;
#    upstream: pytorch/pytorch#189308, open). -> a restricted unpickler that
#    admits only the classes DCP metadata holds, as megatron-core writes it.
# 2. DCP's DefaultLoadPlanner.load_bytes (default_planner.py), which megatron's
#    MCoreLoadPlanner inherits, loads byte items (megatron ShardedObjects such
#    as ``_extra_state``) with ``torch.load(weights_only=False)``.
#    -> the same method with ``weights_only=True``.
# 3. megatron-core loads ``common.pt`` and ShardedObject files with
#    ``torch.load`` and no ``weights_only`` (dist_checkpointing/strategies/
#    common.py), which TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 turns into a full
#    unpickle. -> that module sees a ``torch`` whose ``load`` is weights-only.
# 4. Transformer Engine's set_extra_state unpickles a non-empty extra state
#    (FP8 scaling state) with ``pickle.loads``. megatron_dpo never trains in FP8,
#    so its checkpoints hold the empty tensor; anything else is refused (GPU
#    with TE only).


class UnsafeCheckpointError(pickle.UnpicklingError):
    """A checkpoint file would run code when loaded; it was refused."""


def _dcp_metadata_globals() -> frozenset:
    dcp = "torch.distributed.checkpoint"
    names = {
        (f"{dcp}.metadata", name) for name in (
            "Metadata", "MetadataIndex", "StorageMeta", "TensorStorageMetadata", "BytesStorageMetadata",
            "ChunkStorageMetadata", "TensorProperties", "_MEM_FORMAT_ENCODING",
        )
    }
    names.add((f"{dcp}.filesystem", "_StorageInfo"))
    # megatron-core caches the save plans in the metadata (Metadata.all_local_plans).
    names.update((f"{dcp}.planner", name) for name in ("SavePlan", "WriteItem", "WriteItemType", "TensorWriteData"))
    names.update({("torch", "Size"), ("torch.serialization", "_get_layout")})  # _get_layout: a dict lookup
    names.update(("torch", name) for name, value in vars(torch).items() if isinstance(value, torch.dtype))
    return frozenset(names)


_DCP_METADATA_GLOBALS = _dcp_metadata_globals()


class _DcpMetadataUnpickler(pickle.Unpickler):
    def __init__(self, file):
        super().__init__(file)
        self._path = getattr(file, "name", "DCP metadata")

    def find_class(self, module, name):
        if (module, name) not in _DCP_METADATA_GLOBALS:
            raise UnsafeCheckpointError(
                f"{self._path}: refusing to load it: it references {module}.{name}, which is not a class of "
                "torch.distributed.checkpoint metadata, so loading it could run code. The checkpoint was not "
                "written by megatron_dpo or was altered: do not use it."
            )
        return super().find_class(module, name)


def load_dcp_metadata(file):
    """``pickle.load`` for a DCP ``.metadata`` file, admitting only DCP metadata classes."""
    try:
        return _DcpMetadataUnpickler(file).load()
    except UnsafeCheckpointError:
        raise
    except (EOFError, pickle.UnpicklingError, ValueError, TypeError, AttributeError, KeyError) as error:
        path = getattr(file, "name", "DCP metadata")
        raise pickle.UnpicklingError(f"{path}: truncated or corrupt checkpoint metadata ({error!r})") from error


# The stand-in for the ``pickle`` module inside torch's filesystem.py: its
# writer's ``pickle.dump`` stays as is, ``pickle.load`` is restricted.
_DCP_PICKLE = types.SimpleNamespace(dump=pickle.dump, load=load_dcp_metadata)


def _load_bytes_weights_only(self, read_item, value: io.BytesIO) -> None:
    """DefaultLoadPlanner.load_bytes of torch 2.13 with ``weights_only=True``."""
    from torch.distributed.checkpoint._traverse import set_element

    fqn = read_item.dest_index.fqn
    try:
        loaded = torch.load(value, weights_only=True)
    except pickle.UnpicklingError as error:
        raise UnsafeCheckpointError(
            f"checkpoint item {fqn!r}: refusing to load it, it holds objects a weights-only load does not "
            f"admit ({error}). The checkpoint was not written by megatron_dpo or was altered: do not use it."
        ) from error
    if self.flatten_state_dict:
        set_element(self.original_state_dict, self.mappings[fqn], loaded)
    else:
        self.state_dict[fqn] = loaded


class _WeightsOnlyTorch(types.ModuleType):
    """``torch`` for a module whose ``torch.load`` calls must stay weights-only."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def load(*args, **kwargs):
        return torch.load(*args, **dict(kwargs, weights_only=True))


def _refuse_pickled_extra_state(original):
    @functools.wraps(original)
    def set_extra_state(self, state):
        empty = state is None or (isinstance(state, torch.Tensor) and state.numel() == 0)
        if isinstance(state, io.BytesIO):  # TE < 2.0: torch.save of None when not FP8
            state.seek(0)
            empty = torch.load(state, map_location="cpu", weights_only=True) is None
            state.seek(0)
        if not empty:
            raise UnsafeCheckpointError(
                f"{type(self).__name__}: the checkpoint holds Transformer Engine FP8 state, which TE would "
                "unpickle; megatron_dpo trains without FP8 and does not load it. Use a checkpoint saved "
                "without FP8."
            )
        return original(self, state)

    return set_extra_state


def _patch_safe_loading() -> None:
    from megatron.core.dist_checkpointing.strategies import common as mcore_common
    from torch.distributed.checkpoint import default_planner, filesystem

    if not (getattr(filesystem, "pickle", None) in (pickle, _DCP_PICKLE) and hasattr(mcore_common, "torch")):
        raise RuntimeError(
            f"megatron_dpo's safe checkpoint loading is written for torch 2.13 / megatron-core "
            f"{SUPPORTED_MEGATRON_CORE}; found torch {torch.__version__}, whose checkpoint reader moved. "
            "Re-verify megatron_dpo/parallel/compat.py (Safe loading) against it."
        )
    filesystem.pickle = _DCP_PICKLE
    default_planner.DefaultLoadPlanner.load_bytes = _load_bytes_weights_only
    mcore_common.torch = _WeightsOnlyTorch("torch")
    if cuda_available() and importlib.util.find_spec("transformer_engine") is not None:
        from transformer_engine.pytorch.module.base import TransformerEngineBaseModule

        TransformerEngineBaseModule.set_extra_state = _refuse_pickled_extra_state(
            TransformerEngineBaseModule.set_extra_state)


# -- Checkpoint writes that one rank makes alone ------------------------------
# megatron-core 0.16.1's dist_checkpointing.save has three writes that rank 0
# (the coordinator) makes alone, between collectives: common.pt
# (TorchCommonSaveStrategy.save_common), DCP's .metadata (FileSystemWriterAsync
# .finish, inside save_state_dict_async_finalize, before the broadcast that
# tells the other ranks whether the save failed) and metadata.json
# (serialization.save_config, before a barrier). If one of them fails (a full
# disk), rank 0 raises out of the save while the other ranks wait in the next
# collective: the job hangs until the process-group timeout
# (tests/distributed/test_checkpoint_dist.py reproduces each; no upstream
# issue found; shard writes are fine: DCP gathers their results). The fix,
# active everywhere: inside ``single_rank_write_errors_deferred()`` these
# writes record an OSError instead of raising, so the failing rank completes
# the save's collectives, and the error is raised when the scope ends, where
# the caller can tell every rank (checkpoint/save.py, _on_every_rank).
_deferred_write_errors = None


def _deferrable(write):
    @functools.wraps(write)
    def wrapper(*args, **kwargs):
        if _deferred_write_errors is None:
            return write(*args, **kwargs)
        try:
            return write(*args, **kwargs)
        except OSError as error:
            _deferred_write_errors.append(error)
            return None

    wrapper.defers_write_errors = True
    return wrapper


@contextlib.contextmanager
def single_rank_write_errors_deferred():
    """Scope a dist_checkpointing save (or the finalization of an async one):
    an OSError of a write that one rank makes alone is raised when the scope
    ends, after the save's collectives, instead of in their middle."""
    global _deferred_write_errors
    errors = _deferred_write_errors = []
    try:
        yield
    finally:
        _deferred_write_errors = None
    if errors:
        raise errors[0]


def _patch_single_rank_checkpoint_writes() -> None:
    from megatron.core.dist_checkpointing import serialization
    from megatron.core.dist_checkpointing.strategies.common import TorchCommonSaveStrategy
    from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync

    for owner, name in ((TorchCommonSaveStrategy, "save_common"), (FileSystemWriterAsync, "finish"),
                        (serialization, "save_config")):
        if not getattr(getattr(owner, name), "defers_write_errors", False):
            setattr(owner, name, _deferrable(getattr(owner, name)))


def apply() -> None:
    """Adapt megatron-core to this machine. Safe to call more than once."""
    global _applied
    if _applied:
        return
    if not cuda_available():
        _check_version()
        _patch_torch_for_cpu()
        _patch_megatron_for_cpu()
    _patch_megatron_fixes()
    _patch_safe_loading()
    _patch_single_rank_checkpoint_writes()
    _applied = True
