"""Logits of our LoRA model vs PEFT's, under several layouts.

    torchrun --nproc_per_node=2 tests/distributed/scripts/lora_peft.py OUT.json HF_DIR ADAPTER_DIR

ADAPTER_DIR is a PEFT adapter directory (r, lora_alpha and target modules
from its adapter_config.json). transformers + peft compute the reference
logits; our policy is the HF base (checkpoint.source) with the adapters of
``models.lora.read_peft_adapter``, run forward through megatron-core's
schedule under TP1, TP2 and PP2. Rank 0 writes {"tp<T>pp<P>": max abs error}.
"""

import json
import sys

import torch
import torch.distributed as dist

from megatron_dpo.checkpoint.source import load_source_weights, resolve_source
from megatron_dpo.config.schema import LoraConfig, PolicyConfig
from megatron_dpo.models.build import build_model
from megatron_dpo.models.lora import apply_lora, read_peft_adapter
from megatron_dpo.parallel.dims import ParallelDims
from megatron_dpo.parallel.init import init_distributed, init_parallel, shutdown
from tests.distributed.scripts.conversion_logits import NUM_SEQUENCES, SEQ_LENGTH, megatron_logits

LAYOUTS = [(1, 1), (2, 1), (1, 2)]


def peft_logits(hf_dir: str, adapter_dir: str, tokens_BS: torch.Tensor) -> torch.Tensor:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32), adapter_dir)
    with torch.no_grad():
        return model(tokens_BS).logits


def lora_config(adapter_dir: str) -> LoraConfig:
    with open(f"{adapter_dir}/adapter_config.json") as handle:
        peft_cfg = json.load(handle)
    return LoraConfig(enabled=True, dim=peft_cfg["r"], alpha=float(peft_cfg["lora_alpha"]),
                      target_modules=list(peft_cfg["target_modules"]), init_adapter_path=adapter_dir)


def max_error(hf_dir: str, adapter_dir: str, expected_BSV, tokens_BS, ctx) -> float:
    source = resolve_source(PolicyConfig(model_name=hf_dir, max_total_sequence_length=SEQ_LENGTH))
    chunks = build_model(source.arch, ctx, "float32")
    load_source_weights(chunks, source, ctx, seed=0)
    cfg = lora_config(adapter_dir)
    apply_lora(chunks, source.arch, ctx, cfg, read_peft_adapter(adapter_dir, cfg))
    error = torch.tensor(-1.0, dtype=torch.float64)
    outputs = megatron_logits(chunks, tokens_BS)
    if ctx.is_last_stage:
        for index, local_1SV in enumerate(outputs):
            parts = [torch.empty_like(local_1SV) for _ in range(ctx.tp_size)]
            dist.all_gather(parts, local_1SV.contiguous(), group=ctx.tp_group)
            logits_SV = torch.cat(parts, dim=-1)[0, :, : source.arch.vocab_size]
            error = torch.maximum(error, (logits_SV - expected_BSV[index]).abs().max().double())
    dist.all_reduce(error, op=dist.ReduceOp.MAX)
    return error.item()


def main() -> None:
    out_path, hf_dir, adapter_dir = sys.argv[1:4]
    tokens_BS = torch.randint(0, 700, (NUM_SEQUENCES, SEQ_LENGTH), generator=torch.Generator().manual_seed(0))
    expected = peft_logits(hf_dir, adapter_dir, tokens_BS)  # before init_distributed (conversion_logits.py)
    init_distributed()
    results = {}
    for tp, pp in LAYOUTS:
        ctx = init_parallel(ParallelDims.of_sizes(dist.get_world_size(), tp, pp), seed=0)
        results[f"tp{tp}pp{pp}"] = max_error(hf_dir, adapter_dir, expected, tokens_BS, ctx)
    if dist.get_rank() == 0:
        with open(out_path, "w") as handle:
            json.dump(results, handle)
    shutdown()


if __name__ == "__main__":
    main()
