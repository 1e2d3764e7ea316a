"""Hugging Face model directory -> megatron_dpo checkpoint directory.

The output has a training step directory's layout (``policy/`` with key
"model", ``model_arch.json``, ``tokenizer/``), so ``policy.model_name=<out>``
loads it at any TP/PP/VPP (dist_checkpointing reshards on load).

Design: one process builds the model at TP1/PP1 on the CPU (on a GPU node
too: models/build.py, ``for_conversion``), streams the HF tensors into
it one at a time (``checkpoint.source``), and saves it with the same
``save_policy`` training uses, so the files are exactly what a TP1 run would
write. Peak memory is one copy of the model in the checkpoint's dtype (bf16
stays bf16; fp16, which megatron_dpo does not train in, is widened to fp32),
plus one tensor.
"""

import json
import os
import shutil

import torch
import torch.distributed as dist

from megatron_dpo.checkpoint.dist import save_policy
from megatron_dpo.checkpoint.files import ARCH_FILE, TOKENIZER_DIR, policy_dir
from megatron_dpo.checkpoint.source import ModelSource, hf_architecture, load_source_weights
from megatron_dpo.models.build import build_model
from megatron_dpo.models.conversion import ConversionError, hf_io
from megatron_dpo.parallel.dims import ParallelDims
from megatron_dpo.parallel.init import init_parallel

_PRECISIONS = {torch.bfloat16: "bfloat16", torch.float32: "float32", torch.float16: "float32"}


def _precision(dtype: torch.dtype, path: str) -> str:
    if dtype not in _PRECISIONS:
        raise ConversionError(f"HF checkpoint '{path}' stores {dtype}; supported: bfloat16, float16, float32.")
    return _PRECISIONS[dtype]


def _load_tokenizer(hf_dir: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(hf_dir)
    except (OSError, ValueError) as error:
        raise ConversionError(f"Cannot load the tokenizer of '{hf_dir}': {error}") from error


def hf_to_megatron(hf_dir: str, out_dir: str) -> str:
    """Convert in this process (a world of one). Returns ``out_dir``."""
    if dist.get_world_size() != 1:
        raise ConversionError("The HF -> megatron conversion runs in one process: start it with python, not torchrun.")
    if os.path.exists(out_dir) and os.listdir(out_dir):
        raise ConversionError(f"Output directory '{out_dir}' exists and is not empty; remove it or pick another --out.")
    arch = hf_architecture(hf_dir)
    tokenizer = _load_tokenizer(hf_dir)  # before the slow part: fail early
    with hf_io.HFCheckpoint(hf_dir) as checkpoint:
        precision = _precision(checkpoint.dtype(), hf_dir)
    dims = init_parallel(ParallelDims.of_sizes(world_size=1), seed=0)
    chunks = build_model(arch, dims, precision, trainable=False, for_conversion=True)
    load_source_weights(chunks, ModelSource("hf", hf_dir, arch, hf_dir), dims, seed=0)
    tmp = out_dir.rstrip("/") + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(policy_dir(tmp))
    save_policy(chunks, None, policy_dir(tmp))
    del chunks
    with open(os.path.join(tmp, ARCH_FILE), "w") as handle:
        json.dump(arch.to_dict(), handle, indent=2, sort_keys=True)
    tokenizer.save_pretrained(os.path.join(tmp, TOKENIZER_DIR))
    if os.path.isdir(out_dir):
        os.rmdir(out_dir)  # empty, checked above
    os.replace(tmp, out_dir)
    return out_dir
