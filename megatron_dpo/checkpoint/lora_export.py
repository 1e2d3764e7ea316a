"""A LoRA checkpoint (``step_N/`` of a run with ``policy.lora_cfg.enabled``)
-> a PEFT adapter directory, or a merged Hugging Face model directory.

A LoRA step dir holds the adapters only (``policy/``, resharded on load like
any dist checkpoint), with the config that names the base
(``policy.model_name``) and the LoRA settings. No model is built:

- adapter export: ``adapter_config.json`` (r, lora_alpha, target_modules in HF
  names, base_model_name_or_path) and ``adapter_model.safetensors`` under
  PEFT's key names, which ``peft.PeftModel.from_pretrained`` loads onto the
  HF base;
- merged export: each base tensor read from the source, plus
  ``scaling * B @ A`` on the adapted linears, written as hf_export writes a
  policy (same files, metadata, marker and replace-safely rules).

Collective over the default process group (every rank reads the adapters,
a few MB; rank 0 writes).
"""

import json
import os
from typing import Callable, Dict, Tuple

import torch
import torch.distributed as dist

from megatron_dpo.checkpoint import hf_export
from megatron_dpo.checkpoint.files import CONFIG_FILE, policy_dir
from megatron_dpo.checkpoint.source import resolve_source
from megatron_dpo.config import load_config
from megatron_dpo.config.schema import Config
from megatron_dpo.models import lora, weights
from megatron_dpo.models.architecture import ModelArchitecture
from megatron_dpo.models.conversion import ConversionError, hf_io, llama


def is_lora_checkpoint(checkpoint_dir: str) -> bool:
    path = os.path.join(checkpoint_dir, CONFIG_FILE)
    return os.path.isfile(path) and load_config(path, []).policy.lora_cfg.enabled


def read_adapters(checkpoint_dir: str) -> Tuple[Config, ModelArchitecture, Dict[str, torch.Tensor]]:
    """Collective: (the run's config, the architecture, every full adapter tensor by canonical name)."""
    arch = hf_export.read_architecture(checkpoint_dir)
    cfg = load_config(os.path.join(checkpoint_dir, CONFIG_FILE), [])
    if not cfg.policy.lora_cfg.enabled:
        raise ConversionError(f"'{checkpoint_dir}' is not a LoRA checkpoint (policy.lora_cfg.enabled=false in "
                              f"its {CONFIG_FILE}): export it with megatron_to_hf.")
    path = policy_dir(checkpoint_dir)
    slots = {name: slot for name, slot in hf_export.tensor_slots(path, arch).items() if ".lora." in name}
    names = sorted(slots, key=lambda n: (int(n.split(".")[2]), n))
    tensors = hf_export.load_tensors(path, slots, names)
    return cfg, arch, {name: tensors[name].float() for name in names}


def _write_dir(out_dir: str, source_dir: str, write: Callable[[str], None]) -> None:
    """Rank 0: ``write(tmp)`` fills a fresh work dir (with our marker), which then replaces ``out_dir``."""
    hf_export.check_export_dir(out_dir, (source_dir,))
    tmp = hf_export.work_dir(out_dir, "partial")
    hf_export.remove_ours(tmp)
    os.makedirs(tmp)
    with open(os.path.join(tmp, hf_export.EXPORT_MARKER), "w") as handle:
        json.dump({"created_by": "megatron_dpo", "checkpoint": os.path.abspath(source_dir)}, handle)
    write(tmp)
    hf_export.publish(tmp, out_dir)


def export_adapter(checkpoint_dir: str, out_dir: str) -> str:
    """Collective: the checkpoint's adapters as a PEFT adapter directory."""
    from safetensors.torch import save_file

    cfg, _, adapters = read_adapters(checkpoint_dir)

    def write(tmp: str) -> None:
        config = lora.peft_config(cfg.policy.lora_cfg, cfg.policy.model_name, lora.hf_target_modules(list(adapters)))
        with open(os.path.join(tmp, lora.ADAPTER_CONFIG), "w") as handle:
            json.dump(config, handle, indent=2)
        save_file({lora.peft_key(name): tensor.contiguous() for name, tensor in adapters.items()},
                  os.path.join(tmp, lora.ADAPTER_WEIGHTS), metadata={"format": "pt"})

    if dist.get_rank() == 0:
        _write_dir(out_dir, checkpoint_dir, write)
    dist.barrier()
    return out_dir


def _base_tensors(cfg: Config):
    """(canonical name -> full base tensor, closer) of the run's source model."""
    source = resolve_source(cfg.policy)
    if source.kind == "preset":
        return (lambda name: weights.random_full_tensor(name, source.arch, cfg.dpo.seed)), (lambda: None)
    if source.kind == "hf":
        checkpoint = hf_io.HFCheckpoint(source.path).__enter__()
        return llama.canonical_from_hf(checkpoint.tensor, source.arch), checkpoint.close
    raise ConversionError(f"merged export of a LoRA run on a megatron_dpo checkpoint base ({source.path}) is not "
                          "supported: export that base to HF first and train on it, or export the adapter.")


def merged_tensors(cfg: Config, arch: ModelArchitecture, adapters: Dict[str, torch.Tensor],
                   base_tensor: Callable[[str], torch.Tensor], name: str) -> torch.Tensor:
    """One canonical tensor of the merged model: base + scaling * B @ A where adapted."""
    full = base_tensor(name)
    linear = name.split(".", 3)[3].removesuffix(".weight") if name.startswith("decoder.layers.") else ""
    prefix = name.removesuffix(".weight") + ".lora."
    pairs = {key[len(prefix):].split(".")[0]: None for key in adapters if key.startswith(prefix)}
    if not pairs:
        return full
    pairs = {part: (adapters[f"{prefix}{part}.A"], adapters[f"{prefix}{part}.B"]) for part in pairs}
    scaling = cfg.policy.lora_cfg.alpha / cfg.policy.lora_cfg.dim
    return (full.float() + lora.merged_delta(linear, pairs, scaling, arch)).to(full.dtype)


def export_merged(checkpoint_dir: str, out_dir: str,
                  max_shard_bytes: int = hf_export.DEFAULT_MAX_SHARD_BYTES) -> str:
    """Collective: base + adapters as one HF model directory (rank 0 writes it)."""
    cfg, arch, adapters = read_adapters(checkpoint_dir)

    def write(tmp: str) -> None:
        base_tensor, close = _base_tensors(cfg)
        try:
            names = weights.canonical_names(arch)
            dtype = base_tensor(names[0]).dtype
            nbytes = {n: dtype.itemsize * torch.Size(weights.full_shape(n, arch)).numel() for n in names}
            shards = hf_export.plan_shards(names, nbytes, max_shard_bytes)
            for index, shard in enumerate(shards):
                tensors = {name: merged_tensors(cfg, arch, adapters, base_tensor, name) for name in shard}
                hf_io.save_shard(os.path.join(tmp, hf_io.shard_file_name(index, len(shards))),
                                 hf_export.hf_tensors(shard, tensors, arch))
        finally:
            close()
        weight_map = {hf: hf_io.shard_file_name(index, len(shards))
                      for index, shard in enumerate(shards) for hf in llama.expected_hf_names(shard)}
        hf_io.write_index(tmp, weight_map, sum(nbytes.values()))
        hf_export.write_metadata(tmp, checkpoint_dir, arch, dtype)

    if dist.get_rank() == 0:
        _write_dir(out_dir, checkpoint_dir, write)
    dist.barrier()
    return out_dir
