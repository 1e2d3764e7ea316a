"""megatron_dpo checkpoint (``step_N/``) -> Hugging Face model directory, streamed.

Design: no model is built. The policy's dist checkpoint keeps every tensor
under one global key and shape whatever TP/PP/VPP wrote it (transformer layers
stacked on a leading axis: ``decoder.layers.mlp.linear_fc1.weight`` is
[L, 2F, H], norms under TE names such as ``linear_qkv.layer_norm_weight``,
vocab rows padded for the TP size that saved it). The exporter reads that
metadata, plans output files of at most ``max_shard_bytes``, and for one file
at a time loads just its tensors through dist_checkpointing (which reshards:
a TP-split tensor comes back whole, fc1 as [gate; up]), splits them into HF
tensors, drops the vocab padding and writes the file. Memory: one output file
plus one tensor.

Collective over the default process group. The script runs it as a world of
one; at the end of training rank r writes files r, r + W, ..., rank 0 the
config, generation config, tokenizer and index; the directory appears complete
(renamed from ``.<out>.megatron_dpo_partial``).

User files are never touched: an export directory carries the marker file
``.megatron_dpo_export``; an existing target is replaced only when it carries
it (or is empty), the directory that held it is moved aside and only then
deleted, and the work directories beside it (``.<out>.megatron_dpo_partial``,
``.<out>.megatron_dpo_old``) are deleted only when they carry the marker too.
"""

import json
import os
import shutil
from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

import torch
import torch.distributed as dist

from megatron_dpo.models import weights
from megatron_dpo.models.architecture import ModelArchitecture
from megatron_dpo.models.conversion import ConversionError, hf_io, llama, registry
from megatron_dpo.checkpoint.files import ARCH_FILE, TOKENIZER_DIR, is_model_dir, policy_dir

DEFAULT_MAX_SHARD_BYTES = 5 * 2**30
EXPORT_MARKER = ".megatron_dpo_export"
_MODEL_PREFIXES = ("embedding.", "decoder.", "output_layer.")
_VOCAB_PARAMS = ("embedding.word_embeddings.weight", "output_layer.weight")
_STACKED_EXPERTS = ".experts.experts."


@dataclass(frozen=True)
class _Slot:
    """Where one canonical tensor lives in the dist checkpoint."""

    key: str
    # (index, count) on each stacked axis: the layer axis, then the expert
    # axis of MoE experts ([layers, experts, ...]); () for an unstacked tensor.
    stacked: Tuple[Tuple[int, int], ...]
    shape: Tuple[int, ...]  # stored (vocab-padded) full shape
    dtype: torch.dtype


def read_architecture(checkpoint_dir: str) -> ModelArchitecture:
    path = os.path.join(checkpoint_dir, ARCH_FILE)
    if not is_model_dir(checkpoint_dir):
        raise ConversionError(
            f"'{checkpoint_dir}' is not a megatron_dpo checkpoint (needs {ARCH_FILE} and policy/): "
            "point to a step_N/ directory or a converted checkpoint."
        )
    with open(path) as handle:
        return ModelArchitecture.from_dict(json.load(handle))


def tensor_slots(policy_dir: str, arch: ModelArchitecture) -> Dict[str, _Slot]:
    from megatron.core import dist_checkpointing

    slots = {}
    for key, meta in dist_checkpointing.load_tensors_metadata(policy_dir).items():
        shape = tuple(meta.global_shape)
        if not key.startswith("decoder.layers."):
            if key.startswith(_MODEL_PREFIXES):
                slots[key] = _Slot(key, (), shape, meta.dtype)
            continue
        rest = key[len("decoder.layers."):]
        if _STACKED_EXPERTS in rest:  # megatron's SequentialMLP / TEGroupedMLP layout
            for index in range(shape[0]):
                for expert in range(shape[1]):
                    local = rest.replace(_STACKED_EXPERTS, f".experts.local_experts.{expert}.")
                    name = weights.canonical_name(f"decoder.layers.{index}.{local}", 0, arch.tie_word_embeddings)
                    slots[name] = _Slot(key, ((index, shape[0]), (expert, shape[1])), shape[2:], meta.dtype)
            continue
        for index in range(shape[0]):
            name = weights.canonical_name(f"decoder.layers.{index}.{rest}", 0, arch.tie_word_embeddings)
            slots[name] = _Slot(key, ((index, shape[0]),), shape[1:], meta.dtype)
    return slots


def _hf_shape(name: str, shape: Tuple[int, ...], arch: ModelArchitecture) -> Tuple[int, ...]:
    if name in _VOCAB_PARAMS and shape[0] >= arch.vocab_size:
        return (arch.vocab_size,) + shape[1:]
    return shape


def _check_slots(slots: Dict[str, _Slot], arch: ModelArchitecture, policy_dir: str) -> None:
    expected = weights.canonical_names(arch)
    missing = [name for name in expected if name not in slots]
    unexpected = sorted(set(slots) - set(expected))
    wrong = [
        f"{name} {_hf_shape(name, slots[name].shape, arch)} != {weights.full_shape(name, arch)}"
        for name in expected
        if name in slots and _hf_shape(name, slots[name].shape, arch) != weights.full_shape(name, arch)
    ]
    if missing or unexpected or wrong:
        raise ConversionError(
            f"Checkpoint '{policy_dir}' does not match {ARCH_FILE}: missing {missing}, unexpected "
            f"{unexpected}, wrong shapes {wrong}. Use the {ARCH_FILE} written with this checkpoint."
        )


def load_tensors(policy_dir: str, slots: Dict[str, _Slot], names: List[str]) -> Dict[str, torch.Tensor]:
    """Collective: every rank loads its own list of full canonical tensors."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing import ShardedTensor

    request = {}
    for name in names:
        slot = slots[name]
        # A [1, (1,) ...] slice of the stacked [L, (E,) ...] tensor (or the whole unstacked one).
        data = torch.empty((1,) * len(slot.stacked) + slot.shape, dtype=slot.dtype)
        offsets = [(axis, index, count) for axis, (index, count) in enumerate(slot.stacked)]
        request[name] = ShardedTensor.from_rank_offsets(slot.key, data, *offsets, replica_id=0)
    # The requests cover only part of the checkpoint: skip megatron's exactly-once check.
    loaded = dist_checkpointing.load(request, policy_dir, validate_access_integrity=False)
    return {name: loaded[name].reshape(slots[name].shape) for name in names}


def plan_shards(names: List[str], nbytes: Dict[str, int], max_shard_bytes: int) -> List[List[str]]:
    """Consecutive canonical tensors grouped into files of at most max_shard_bytes (one tensor may exceed it)."""
    shards, size = [[]], 0
    for name in names:
        if shards[-1] and size + nbytes[name] > max_shard_bytes:
            shards, size = shards + [[]], 0
        shards[-1].append(name)
        size += nbytes[name]
    return shards


def hf_tensors(names: List[str], tensors: Dict[str, torch.Tensor], arch: ModelArchitecture) -> Dict[str, torch.Tensor]:
    hf = {}
    for name in names:
        full = tensors.pop(name)  # freed as soon as it is split
        if name in _VOCAB_PARAMS:
            full = full[: arch.vocab_size]
        hf.update(llama.hf_from_canonical(name, full, arch))
    return hf


def _is_ours_or_empty(directory: str) -> bool:
    return os.path.isdir(directory) and (
        os.path.isfile(os.path.join(directory, EXPORT_MARKER)) or not os.listdir(directory))


def work_dir(out_dir: str, purpose: str) -> str:
    """``.<name>.megatron_dpo_<purpose>`` beside ``out_dir`` (purpose: partial, old)."""
    parent, name = os.path.split(os.path.abspath(out_dir))
    return os.path.join(parent, f".{name}.megatron_dpo_{purpose}")


def check_export_dir(out_dir: str, source_dirs: Sequence[str] = ()) -> None:
    """Refuse an export target unless it is new, empty or an earlier export
    of ours (marker), and is none of ``source_dirs`` (the model and the
    checkpoints the run reads) or a directory above one. Call it before training."""
    target = os.path.realpath(out_dir)
    for source in source_dirs:
        real_source = os.path.realpath(source)
        if real_source == target or real_source.startswith(target.rstrip(os.sep) + os.sep):
            raise ConversionError(
                f"Export directory '{out_dir}' would replace '{source}', which this run reads: pick a new directory."
            )
    if os.path.lexists(out_dir) and not os.path.isdir(out_dir):
        raise ConversionError(f"Export directory '{out_dir}' is a file: pick a new or empty directory.")
    if os.path.isdir(out_dir) and not _is_ours_or_empty(out_dir):
        raise ConversionError(
            f"Export directory '{out_dir}' is not empty and has no {EXPORT_MARKER} marker (megatron_dpo did not "
            "export to it): refusing to replace it. Pick a new or empty directory."
        )
    for work in (work_dir(out_dir, "partial"), work_dir(out_dir, "old")):
        if os.path.lexists(work) and not _is_ours_or_empty(work):
            raise ConversionError(
                f"'{work}' (the exporter's work directory for '{out_dir}') holds files megatron_dpo did not write: "
                "move it away, or pick another export directory."
            )


def remove_ours(directory: str) -> None:
    """Delete a work directory left by an earlier export (check_export_dir made sure it is ours)."""
    if os.path.lexists(directory):
        assert _is_ours_or_empty(directory), directory
        shutil.rmtree(directory)


def write_metadata(tmp: str, checkpoint_dir: str, arch: ModelArchitecture, dtype: torch.dtype) -> None:
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    tokenizer = AutoTokenizer.from_pretrained(os.path.join(checkpoint_dir, TOKENIZER_DIR))
    tokenizer.save_pretrained(tmp)
    fields = registry.hf_config_from_architecture(arch)
    config = AutoConfig.for_model(
        fields.pop("model_type"), **fields, dtype=str(dtype).removeprefix("torch."),
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    config.save_pretrained(tmp)
    GenerationConfig.from_model_config(config).save_pretrained(tmp)


def publish(tmp: str, out_dir: str) -> None:
    """Replace ``out_dir`` by ``tmp``; the old directory is deleted only once it is out of the way."""
    check_export_dir(out_dir)  # again: files may have appeared there since the run started
    old = work_dir(out_dir, "old")
    remove_ours(old)
    if os.path.isdir(out_dir):
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    remove_ours(old)


def megatron_to_hf(checkpoint_dir: str, out_dir: str, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> str:
    """Collective (see the module docstring). Returns ``out_dir``."""
    arch = read_architecture(checkpoint_dir)
    check_export_dir(out_dir, (checkpoint_dir,))
    policy_path = policy_dir(checkpoint_dir)
    slots = tensor_slots(policy_path, arch)
    _check_slots(slots, arch, policy_path)
    names = weights.canonical_names(arch)
    nbytes = {n: slots[n].dtype.itemsize * torch.Size(_hf_shape(n, slots[n].shape, arch)).numel() for n in names}
    shards = plan_shards(names, nbytes, max_shard_bytes)
    rank, world_size = dist.get_rank(), dist.get_world_size()
    tmp = work_dir(out_dir, "partial")
    if rank == 0:
        remove_ours(tmp)
        os.makedirs(tmp)
        with open(os.path.join(tmp, EXPORT_MARKER), "w") as handle:
            json.dump({"created_by": "megatron_dpo", "checkpoint": os.path.abspath(checkpoint_dir)}, handle)
    dist.barrier()
    for first in range(0, len(shards), world_size):
        index = first + rank
        mine = shards[index] if index < len(shards) else []
        tensors = load_tensors(policy_path, slots, mine)
        if mine:
            file = os.path.join(tmp, hf_io.shard_file_name(index, len(shards)))
            hf_io.save_shard(file, hf_tensors(mine, tensors, arch))
    dist.barrier()
    if rank == 0:
        weight_map = {
            hf: hf_io.shard_file_name(index, len(shards))
            for index, shard in enumerate(shards) for hf in llama.expected_hf_names(shard, arch)
        }
        hf_io.write_index(tmp, weight_map, sum(nbytes.values()))
        write_metadata(tmp, checkpoint_dir, arch, slots[names[0]].dtype)
        publish(tmp, out_dir)
    dist.barrier()
    return out_dir
