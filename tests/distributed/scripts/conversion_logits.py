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

import torch
import torch.distributed as dist

from megatron_dpo.config.schema import PolicyConfig
from megatron_dpo.models.build import build_model
from megatron_dpo.checkpoint.source import load_source_weights, resolve_source
from megatron_dpo.parallel.dims import ParallelDims
from megatron_dpo.parallel.init import init_distributed, init_parallel, shutdown

LAYOUTS = [(1, 1, None), (2, 1, None), (1, 2, None), (2, 2, None), (1, 2, 2)]
HF_DIR_LAYOUT = (2, 2, None)
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


def main() -> None:
    out_path, specs = sys.argv[1], [arg.split("=", 1) for arg in sys.argv[2:]]
    tokens_BS = torch.randint(0, 700, (NUM_SEQUENCES, SEQ_LENGTH), generator=torch.Generator().manual_seed(0))
    # Before init_distributed: the CPU compat layer's torch.tensor wrapper
    # escapes torch.device("meta"), and transformers' meta-device init then
    # leaves the rotary inv_freq buffer uninitialised.
    expected = {name: hf_logits(dirs.split(",")[0], tokens_BS) for name, dirs in specs}
    init_distributed()
    results = {name: {} for name, _ in specs}
    for tp, pp, vpp in LAYOUTS:
        ctx = init_parallel(ParallelDims.of_sizes(dist.get_world_size(), tp, pp, vpp), seed=0)
        for name, dirs in specs:
            hf_dir, megatron_dir = dirs.split(",")
            for source_name, path in (("megatron", megatron_dir), ("hf", hf_dir)):
                if source_name == "megatron" or (tp, pp, vpp) == HF_DIR_LAYOUT:
                    layout = f"{source_name} tp{tp}pp{pp}vpp{vpp or 1}"
                    results[name][layout] = max_error(path, expected[name], tokens_BS, ctx)
    if dist.get_rank() == 0:
        with open(out_path, "w") as handle:
            json.dump(results, handle, indent=1)
    shutdown()


if __name__ == "__main__":
    main()
