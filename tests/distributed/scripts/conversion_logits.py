"""Logits of converted models vs transformers, under several parallel layouts.

    torchrun --nproc_per_node=4 tests/distributed/scripts/conversion_logits.py OUT.json NAME=HF_DIR,MEGATRON_DIR ...

For each model, its converted megatron_dpo checkpoint under every layout
(TP1, TP2, PP2, TP2xPP2, PP2xVPP2; data parallelism fills the other ranks) and
the HF directory itself under TP2xPP2 are built through checkpoint.source + build
+ load_source_weights and run forward-only through megatron-core's schedule.
The last stage's vocab-parallel logits, gathered over TP for this comparison
only and cut to the real vocabulary, are compared with transformers' fp32
logits. Rank 0 writes {NAME: {"<source> tp<T>pp<P>vpp<V>": max abs error}}.
"""

import json
import sys
from typing import Callable, List

import torch
import torch.distributed as dist

from megatron_dpo.config.schema import PolicyConfig
from megatron_dpo.models.build import build_model
from megatron_dpo.checkpoint.source import load_source_weights, resolve_source
from megatron_dpo.parallel.dims import ParallelDims
from megatron_dpo.parallel.init import init_distributed, init_parallel, shutdown

# ParallelDims.of_sizes arguments of each layout (data parallelism fills the world).
LAYOUTS = [dict(tp_size=1), dict(tp_size=2), dict(pp_size=2), dict(tp_size=2, pp_size=2),
           dict(pp_size=2, vpp_size=2)]
HF_DIR_LAYOUT = dict(tp_size=2, pp_size=2)
NUM_SEQUENCES, SEQ_LENGTH = 2, 24


def hf_logits(hf_dir: str, tokens_BS: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    with torch.no_grad():
        return model(tokens_BS).logits


def megatron_logits(chunks, tokens_BS: torch.Tensor):
    """Per micro-batch (one sequence each) vocab-parallel logits [1, S, V_local] on the last stage."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    position_ids = torch.arange(SEQ_LENGTH).unsqueeze(0)

    def forward_step(data_iterator, model):
        return model(next(data_iterator), position_ids, attention_mask=None), lambda out, non_loss_data=True: out

    microbatches = list(tokens_BS.split(1))
    iterators = [iter(microbatches) for _ in chunks] if len(chunks) > 1 else iter(microbatches)
    return get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iterators,
        model=chunks if len(chunks) > 1 else chunks[0], num_microbatches=len(microbatches),
        seq_length=SEQ_LENGTH, micro_batch_size=1, forward_only=True, collect_non_loss_data=True,
    )


def max_error(path: str, expected_BSV: torch.Tensor, tokens_BS: torch.Tensor, ctx) -> float:
    source = resolve_source(PolicyConfig(model_name=path, max_total_sequence_length=SEQ_LENGTH))
    chunks = build_model(source.arch, ctx, "float32", trainable=False)
    load_source_weights(chunks, source, ctx, seed=0)
    error = torch.tensor(-1.0, dtype=torch.float64)  # -1: this rank compared nothing
    if ctx.is_last_stage:
        for index, local_1SV in enumerate(megatron_logits(chunks, tokens_BS)):
            parts = [torch.empty_like(local_1SV) for _ in range(ctx.tp_size)]
            dist.all_gather(parts, local_1SV.contiguous(), group=ctx.tp_group)
            logits_SV = torch.cat(parts, dim=-1)[0, :, : source.arch.vocab_size]
            error = torch.maximum(error, (logits_SV - expected_BSV[index]).abs().max().double())
    else:
        megatron_logits(chunks, tokens_BS)
    dist.all_reduce(error, op=dist.ReduceOp.MAX)
    return error.item()


def compare(layouts: List[dict], hf_dir_layout: dict, label: Callable[[dict], str]) -> None:
    """The script's work for ``layouts`` (each model's converted checkpoint
    under each, its HF directory under ``hf_dir_layout``); ``label`` names a
    layout in the results."""
    out_path, specs = sys.argv[1], [arg.split("=", 1) for arg in sys.argv[2:]]
    tokens_BS = torch.randint(0, 700, (NUM_SEQUENCES, SEQ_LENGTH), generator=torch.Generator().manual_seed(0))
    # Before init_distributed: the CPU compat layer's torch.tensor wrapper
    # escapes torch.device("meta"), and transformers' meta-device init then
    # leaves the rotary inv_freq buffer uninitialised.
    expected = {name: hf_logits(dirs.split(",")[0], tokens_BS) for name, dirs in specs}
    init_distributed()
    results = {name: {} for name, _ in specs}
    for layout in layouts:
        ctx = init_parallel(ParallelDims.of_sizes(dist.get_world_size(), **layout), seed=0)
        for name, dirs in specs:
            hf_dir, megatron_dir = dirs.split(",")
            for source_name, path in (("megatron", megatron_dir), ("hf", hf_dir)):
                if source_name == "megatron" or layout == hf_dir_layout:
                    results[name][f"{source_name} {label(layout)}"] = max_error(path, expected[name], tokens_BS, ctx)
    if dist.get_rank() == 0:
        with open(out_path, "w") as handle:
            json.dump(results, handle, indent=1)
    shutdown()


def main() -> None:
    compare(LAYOUTS, HF_DIR_LAYOUT,
            lambda layout: "tp{}pp{}vpp{}".format(layout.get("tp_size", 1), layout.get("pp_size", 1),
                                                  layout.get("vpp_size", 1)))


if __name__ == "__main__":
    main()
