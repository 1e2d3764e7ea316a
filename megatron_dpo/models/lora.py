"""LoRA adapters over megatron-core's fused linear layers, 1:1 with PEFT.

Each HF target module (q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj,
down_proj) gets its own pair A [r, in], B [out, r], as PEFT keeps them, and
adds ``scaling * B @ A @ dropout(x)`` (scaling = alpha / r) to its rows of the
fused megatron output:

- ``linear_qkv`` (column-parallel): rows grouped per query group
  ``[q_g; k_g; v_g]``; a TP rank holds whole groups, so it holds the matching
  contiguous rows of B_q, B_k, B_v (A replicated). The adapter input's
  gradient is all-reduced over TP like the base layer's (``copy_to`` region),
  so A gets the full gradient on every TP rank.
- ``linear_fc1`` (column-parallel): ``[gate; up]`` per TP rank; B_gate and
  B_up split by rows like the base weight.
- ``linear_proj`` / ``linear_fc2`` (row-parallel): the input is split over TP,
  so A is split by columns; the partial ``A_r x_r`` (r values per token) is
  all-reduced over TP before the replicated B.

Canonical names extend ``models.weights``': ``decoder.layers.{i}.
self_attention.linear_qkv.lora.q_proj.A`` (global layer index, so PP is just
which layers a rank holds). Fresh adapters follow PEFT's
``reset_lora_parameters`` (init_lora_weights=True): A kaiming-uniform with
a=sqrt(5), i.e. U(-1/sqrt(in), 1/sqrt(in)), B zero, each A drawn from
(seed, canonical name) as a full tensor and then sliced for TP, so every
layout starts identical.

The reference of a LoRA run is the policy with its *initial* adapters: with
fresh adapters (B = 0) that is the base alone; from ``init_adapter_path`` a
frozen copy of the initial A and B (buffers, a few MB) is used. No second copy
of the base weights exists.
"""

import math
import zlib
from contextlib import contextmanager
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch
import torch.nn.functional as F

from megatron_dpo.config.schema import LORA_HF_TARGETS, LoraConfig, lora_hf_targets
from megatron_dpo.models.architecture import ModelArchitecture
from megatron_dpo.models.build import unwrap
from megatron_dpo.models.weights import named_shards
from megatron_dpo.parallel.dims import ParallelDims

# megatron linear -> its HF parts, in fused-output order.
_PARTS = {
    "self_attention.linear_qkv": ("q_proj", "k_proj", "v_proj"),
    "self_attention.linear_proj": ("o_proj",),
    "mlp.linear_fc1": ("gate_proj", "up_proj"),
    "mlp.linear_fc2": ("down_proj",),
}
_ROW_PARALLEL = ("self_attention.linear_proj", "mlp.linear_fc2")
_HF_MODULE = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
              "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}


def part_shapes(part: str, arch: ModelArchitecture, dim: int) -> Tuple[Tuple[int, int], Tuple[int, int]]:
    """Full (TP=1) shapes of one HF module's A [r, in] and B [out, r]."""
    q_rows, kv_rows = arch.num_attention_heads * arch.head_dim, arch.num_query_groups * arch.head_dim
    in_out = {
        "q_proj": (arch.hidden_size, q_rows), "k_proj": (arch.hidden_size, kv_rows),
        "v_proj": (arch.hidden_size, kv_rows), "o_proj": (q_rows, arch.hidden_size),
        "gate_proj": (arch.hidden_size, arch.ffn_hidden_size), "up_proj": (arch.hidden_size, arch.ffn_hidden_size),
        "down_proj": (arch.ffn_hidden_size, arch.hidden_size),
    }
    fan_in, fan_out = in_out[part]
    return (dim, fan_in), (fan_out, dim)


def split_dim(linear: str, which: str) -> Optional[int]:
    """The dim TP splits an adapter tensor along (None: replicated)."""
    if linear in _ROW_PARALLEL:
        return 1 if which == "A" else None
    return 0 if which == "B" else None


def random_a(name: str, shape: Tuple[int, int], seed: int) -> torch.Tensor:
    """PEFT's kaiming_uniform_(a=sqrt(5)) on [r, in]: U(-1/sqrt(in), 1/sqrt(in)), drawn by name."""
    bound = 1.0 / math.sqrt(shape[1])
    generator = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


def fresh_adapter(name: str, shape: Tuple[int, int], seed: int) -> torch.Tensor:
    return random_a(name, shape, seed) if name.endswith(".A") else torch.zeros(shape)


def peft_key(name: str) -> str:
    """Canonical adapter name -> PEFT's key in adapter_model.safetensors."""
    _, _, index, rest = name.split(".", 3)
    _, _, part, which = rest.rsplit(".", 3)
    return f"base_model.model.model.layers.{index}.{_HF_MODULE[part]}.{part}.lora_{which}.weight"


class LoRAPair(torch.nn.Module):
    """One HF module's A and B (this TP rank's shards), plus the frozen initial
    values when the reference needs them (a non-zero initial B)."""

    def __init__(self, a_shape: Tuple[int, int], b_shape: Tuple[int, int], dtype: torch.dtype, device):
        super().__init__()
        self.A = torch.nn.Parameter(torch.zeros(a_shape, dtype=dtype, device=device))
        self.B = torch.nn.Parameter(torch.zeros(b_shape, dtype=dtype, device=device))
        # The frozen initial (A, B): what the reference uses, and what a run
        # restarts from when no checkpoint is usable.
        self.initial: Optional[Tuple[torch.Tensor, torch.Tensor]] = None

    def weights(self, reference: bool) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
        if not reference:
            return self.A, self.B
        return None if not self.initial[1].any() else self.initial  # B = 0: the base alone


class LinearAdapters(torch.nn.Module):
    """The adapters of one megatron linear; ``delta(x)`` is added to its output."""

    def __init__(self, linear: str, parts: Dict[str, LoRAPair], arch: ModelArchitecture, dims: ParallelDims,
                 cfg: LoraConfig, tp_group):
        super().__init__()
        self.linear = linear
        self.part_names = list(parts)
        for part, pair in parts.items():  # named lora.<part>.A / .B, as canonical names are
            self.add_module(part, pair)
        self.scaling = cfg.alpha / cfg.dim
        self.dropout = torch.nn.Dropout(cfg.dropout) if cfg.dropout > 0 else torch.nn.Identity()
        self.tp_group = tp_group
        self.reference = False  # True: the initial adapters (the reference pass)
        self.num_groups = arch.num_query_groups // dims.tp_size
        self.head_dim = arch.head_dim
        self.heads_per_group = arch.num_attention_heads // arch.num_query_groups
        self.local_rows = {"q_proj": arch.num_attention_heads * arch.head_dim // dims.tp_size,
                           "k_proj": arch.num_query_groups * arch.head_dim // dims.tp_size,
                           "v_proj": arch.num_query_groups * arch.head_dim // dims.tp_size,
                           "gate_proj": arch.ffn_hidden_size // dims.tp_size,
                           "up_proj": arch.ffn_hidden_size // dims.tp_size}

    def _column_part(self, x, A, B):
        from megatron.core.tensor_parallel.mappings import copy_to_tensor_model_parallel_region

        return F.linear(copy_to_tensor_model_parallel_region(F.linear(x, A), group=self.tp_group), B)

    def delta(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        """[s, b, out_local] to add to the layer's output, or None (nothing active)."""
        from megatron.core.tensor_parallel.mappings import reduce_from_tensor_model_parallel_region

        x = x if self.reference else self.dropout(x)  # the reference is deterministic
        if self.linear in _ROW_PARALLEL:
            weights = getattr(self, self.part_names[0]).weights(self.reference)
            if weights is None:
                return None
            A, B = weights
            return self.scaling * F.linear(reduce_from_tensor_model_parallel_region(F.linear(x, A), group=self.tp_group), B)
        outputs = {}
        for part in self.part_names:
            weights = getattr(self, part).weights(self.reference)
            if weights is not None:
                outputs[part] = self._column_part(x, *weights)
        if not outputs:
            return None
        lead = x.shape[:-1]
        full = [outputs.get(part, x.new_zeros(*lead, self.local_rows[part])) for part in _PARTS[self.linear]]
        if self.linear == "mlp.linear_fc1":
            return self.scaling * torch.cat(full, dim=-1)  # [gate_r; up_r]
        q, k, v = (t.reshape(*lead, self.num_groups, -1) for t in full)  # per local query group
        return self.scaling * torch.cat([q, k, v], dim=-1).reshape(*lead, -1)


def _add_delta(module, args, output):
    delta = module.lora.delta(args[0])
    if delta is None:
        return output
    out, bias = output
    return out + delta.to(out.dtype), bias


def _adapter_sharded_state_dict(module, prefix="", sharded_offsets=(), metadata=None):
    """The adapters only (a LoRA checkpoint holds no base weights), TP-sharded as ``split_dim`` says."""
    from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

    state = module.lora.state_dict(prefix="", keep_vars=True)
    axes = {key: split_dim(module.lora.linear, key[-1]) for key in state}
    return make_sharded_tensors_for_checkpoint(
        state, f"{prefix}lora.", {k: a for k, a in axes.items() if a is not None}, sharded_offsets,
        tp_group=module.tp_group, dp_cp_group=metadata["dp_cp_group"],
    )


def _layers(chunks) -> Iterator[Tuple[int, torch.nn.Module]]:
    from megatron_dpo.models.build import layer_offset

    for chunk in chunks:
        offset = layer_offset(chunk)
        for index, layer in enumerate(unwrap(chunk).decoder.layers):
            yield offset + index, layer


def apply_lora(chunks: List[torch.nn.Module], arch: ModelArchitecture, dims: ParallelDims, cfg: LoraConfig,
               full_tensor: Callable[[str, Tuple[int, int]], torch.Tensor]) -> None:
    """Freeze every base parameter and attach the adapters of ``cfg.target_modules``,
    filled from ``full_tensor(canonical name, full shape)``, each with a frozen
    copy of its initial A and B (the reference; a few MB)."""
    for chunk in chunks:
        chunk.requires_grad_(False)
    targets = lora_hf_targets(cfg.target_modules)
    for layer_index, layer in _layers(chunks):
        for linear_name, parts in _PARTS.items():
            wanted = [part for part in parts if part in targets]
            if not wanted:
                continue
            linear = layer.get_submodule(linear_name)
            base = linear.weight
            pairs = {}
            for part in wanted:
                name = f"decoder.layers.{layer_index}.{linear_name}.lora.{part}"
                shapes = part_shapes(part, arch, cfg.dim)
                shards = [_tp_slice(full_tensor(f"{name}.{which}", shape), split_dim(linear_name, which), dims)
                          for which, shape in zip("AB", shapes)]
                pair = LoRAPair(shards[0].shape, shards[1].shape, base.dtype, base.device)
                _tag_tensor_parallel(pair, linear_name, dims)
                with torch.no_grad():
                    pair.A.copy_(shards[0])
                    pair.B.copy_(shards[1])
                pair.initial = (pair.A.detach().clone(), pair.B.detach().clone())
                pairs[part] = pair
            linear.lora = LinearAdapters(linear_name, pairs, arch, dims, cfg, linear.tp_group)
            linear.register_forward_hook(_add_delta)
            linear.sharded_state_dict = _adapter_sharded_state_dict.__get__(linear)


def _tag_tensor_parallel(pair: LoRAPair, linear: str, dims: ParallelDims) -> None:
    """megatron's TP attributes on the split tensor: grad-norm and clipping
    count an untagged parameter on TP rank 0 only (a replica)."""
    from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes

    for which in "AB":
        dim = split_dim(linear, which)
        set_tensor_model_parallel_attributes(getattr(pair, which), dim is not None and dims.tp_size > 1,
                                             dim if dim is not None else 0, 1)


def _tp_slice(full: torch.Tensor, dim: Optional[int], dims: ParallelDims) -> torch.Tensor:
    return full if dim is None or dims.tp_size == 1 else full.chunk(dims.tp_size, dim=dim)[dims.tp_rank]


def adapter_shards(chunks: List[torch.nn.Module], arch: ModelArchitecture) -> Iterator[Tuple[str, torch.nn.Parameter]]:
    """(canonical name, this rank's shard) of every adapter tensor."""
    return ((name, param) for name, param in named_shards(chunks, arch) if ".lora." in name)


def has_adapters(chunk: torch.nn.Module) -> bool:
    return any(isinstance(module, LinearAdapters) for module in chunk.modules())


@torch.no_grad()
def reset_adapters(chunks: List[torch.nn.Module]) -> None:
    """Every adapter back to its initial A and B."""
    for pair in (m for chunk in chunks for m in chunk.modules() if isinstance(m, LoRAPair)):
        pair.A.copy_(pair.initial[0])
        pair.B.copy_(pair.initial[1])


@contextmanager
def reference_adapters(chunks: List[torch.nn.Module]):
    """Within: the chunks compute the reference (the initial adapters)."""
    adapters = [m for chunk in chunks for m in chunk.modules() if isinstance(m, LinearAdapters)]
    for module in adapters:
        module.reference = True
    try:
        yield
    finally:
        for module in adapters:
            module.reference = False


def hf_target_modules(names: List[str]) -> List[str]:
    """The HF module names of canonical adapter names, in LORA_HF_TARGETS order."""
    parts = {name.rsplit(".", 2)[1] for name in names}
    return [part for part in LORA_HF_TARGETS if part in parts]


# -- PEFT adapter directories -------------------------------------------------
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def read_peft_adapter(path: str, cfg: LoraConfig) -> Callable[[str, Tuple[int, int]], torch.Tensor]:
    """A PEFT adapter directory as ``full_tensor(canonical name, shape)`` for
    ``apply_lora``; refused by key when its r, lora_alpha or target modules
    differ from ``policy.lora_cfg``."""
    import json
    import os

    from safetensors.torch import load_file

    from megatron_dpo.config.errors import ConfigError

    key = "policy.lora_cfg.init_adapter_path"
    config_file, weights_file = os.path.join(path, ADAPTER_CONFIG), os.path.join(path, ADAPTER_WEIGHTS)
    if not (os.path.isfile(config_file) and os.path.isfile(weights_file)):
        raise ConfigError(f"{key}={path!r} is not a PEFT adapter directory (needs {ADAPTER_CONFIG} and "
                          f"{ADAPTER_WEIGHTS}): point it at a directory written by save_pretrained.")
    with open(config_file) as handle:
        peft_cfg = json.load(handle)
    targets = sorted(lora_hf_targets(peft_cfg.get("target_modules") or []))
    checks = [("r", peft_cfg.get("r"), "policy.lora_cfg.dim", cfg.dim),
              ("lora_alpha", peft_cfg.get("lora_alpha"), "policy.lora_cfg.alpha", cfg.alpha),
              ("target_modules", targets, "policy.lora_cfg.target_modules", sorted(lora_hf_targets(cfg.target_modules)))]
    for peft_name, value, our_key, ours in checks:
        if value != ours and not (isinstance(ours, float) and value is not None and float(value) == ours):
            raise ConfigError(f"{key}={path!r} has {peft_name}={value!r} but {our_key}={ours!r}: set {our_key} "
                              f"to {value!r}, or pick an adapter trained with {ours!r}.")
    tensors = load_file(weights_file)

    def full_tensor(name: str, shape: Tuple[int, int]) -> torch.Tensor:
        tensor = tensors.get(peft_key(name))
        if tensor is None or tuple(tensor.shape) != tuple(shape):
            found = None if tensor is None else tuple(tensor.shape)
            raise ConfigError(f"{key}={path!r}: {peft_key(name)} should be {tuple(shape)}, found {found}; "
                              "the adapter does not fit policy.model_name.")
        return tensor.float()

    return full_tensor


def peft_config(cfg: LoraConfig, base_model: str, target_modules: List[str]) -> dict:
    """adapter_config.json of an export (PEFT's LoraConfig fields that matter)."""
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": cfg.dim, "lora_alpha": cfg.alpha, "lora_dropout": cfg.dropout, "target_modules": target_modules,
        "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
        "init_lora_weights": True, "inference_mode": True, "modules_to_save": None,
    }


def merged_delta(linear: str, pairs: Dict[str, Tuple[torch.Tensor, torch.Tensor]], scaling: float,
                 arch: ModelArchitecture) -> torch.Tensor:
    """scaling * B @ A of one megatron linear, as its full canonical weight is laid out
    (``pairs``: HF part -> full (A, B); parts without an adapter add zero)."""
    from megatron_dpo.models.conversion import llama

    deltas = []
    for part in _PARTS[linear]:
        (_, fan_in), (fan_out, _) = part_shapes(part, arch, 1)
        deltas.append(scaling * pairs[part][1] @ pairs[part][0] if part in pairs else torch.zeros(fan_out, fan_in))
    return llama.fuse(f"decoder.layers.0.{linear}.weight", deltas, arch)
