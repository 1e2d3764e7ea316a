"""Entry points of scripts/convert_hf_to_megatron.py and convert_megatron_to_hf.py."""

import argparse
import re
import sys
import time
import warnings
from typing import Callable, List, Optional

from megatron_dpo.config.errors import ConfigError

_SIZE = re.compile(r"^(\d+(?:\.\d+)?)\s*(B|KB|MB|GB|TB)?$", re.IGNORECASE)
_UNITS = {"B": 1, "KB": 2**10, "MB": 2**20, "GB": 2**30, "TB": 2**40}


def parse_size(text: str) -> int:
    """'5GB' -> bytes (binary units, as transformers' max_shard_size)."""
    match = _SIZE.match(text.strip())
    if not match:
        raise argparse.ArgumentTypeError(f"invalid size {text!r}: write e.g. 5GB, 500MB or 1000000")
    return int(float(match.group(1)) * _UNITS[(match.group(2) or "B").upper()])


def _run(convert: Callable[[], str]) -> int:
    from megatron_dpo.parallel.init import init_distributed, shutdown

    warnings.filterwarnings("ignore", message=r".*(Transformer Engine|Apex).*not installed.*")
    start = time.perf_counter()
    try:
        init_distributed()
        out_dir = convert()
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    finally:
        shutdown()
    print(f"wrote {out_dir} in {time.perf_counter() - start:.1f} s")
    return 0


def convert_hf_to_megatron(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="HF model directory -> megatron_dpo checkpoint (loads at any TP/PP).")
    parser.add_argument("--hf-dir", required=True, help="HF directory: config.json, *.safetensors, tokenizer")
    parser.add_argument("--out", required=True, help="new directory; use it as policy.model_name")
    args = parser.parse_args(argv)
    from megatron_dpo.checkpoint.hf_import import hf_to_megatron

    return _run(lambda: hf_to_megatron(args.hf_dir, args.out))


def convert_megatron_to_hf(argv: Optional[List[str]] = None) -> int:
    from megatron_dpo.checkpoint.hf_export import DEFAULT_MAX_SHARD_BYTES

    parser = argparse.ArgumentParser(description="megatron_dpo checkpoint (step_N/) -> HF model directory.")
    parser.add_argument("--checkpoint", required=True, help="a step_N/ directory or a converted checkpoint")
    parser.add_argument("--out", help="new or empty directory (an earlier export is replaced); a LoRA "
                        "checkpoint is written merged (base + adapters)")
    parser.add_argument("--adapter-out", help="LoRA checkpoints: write the adapters as a PEFT adapter directory here")
    parser.add_argument("--max-shard-size", type=parse_size, default=DEFAULT_MAX_SHARD_BYTES,
                        help="largest .safetensors file, e.g. 5GB (the default); bounds memory")
    args = parser.parse_args(argv)
    if args.out is None and args.adapter_out is None:
        parser.error("give --out, --adapter-out (LoRA checkpoints) or both")
    return _run(lambda: _export(args.checkpoint, args.out, args.adapter_out, args.max_shard_size))


def _export(checkpoint: str, out: Optional[str], adapter_out: Optional[str], max_shard_bytes: int) -> str:
    from megatron_dpo.checkpoint.hf_export import megatron_to_hf
    from megatron_dpo.checkpoint.lora_export import export_adapter, export_merged, is_lora_checkpoint
    from megatron_dpo.models.conversion import ConversionError

    lora = is_lora_checkpoint(checkpoint)
    if adapter_out is not None:
        if not lora:
            raise ConversionError(f"--adapter-out: '{checkpoint}' is not a LoRA checkpoint (no adapters to export)")
        export_adapter(checkpoint, adapter_out)
    if out is None:
        return adapter_out
    return (export_merged if lora else megatron_to_hf)(checkpoint, out, max_shard_bytes)
