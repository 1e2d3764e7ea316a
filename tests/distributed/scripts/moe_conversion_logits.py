"""Logits of HF Mixture-of-Experts models loaded into megatron vs transformers.

    torchrun --nproc_per_node=4 tests/distributed/scripts/moe_conversion_logits.py OUT.json NAME=HF_DIR,MEGATRON_DIR ...

Each model's converted megatron_dpo checkpoint is built through checkpoint.source
+ build + load_source_weights under EP1, EP2, TP2 and EP2 x PP2 (data
parallelism fills the other ranks), the HF directory itself under EP2 x PP2,
and compared as in conversion_logits.py. Rank 0 writes
{NAME: {"<source> tp<T>pp<P>ep<E>": max abs error}}.
"""

import json
import sys

import torch
import torch.distributed as dist

from megatron_dpo.parallel.dims import ParallelDims
from megatron_dpo.parallel.init import init_distributed, init_parallel, shutdown
from tests.distributed.scripts.conversion_logits import NUM_SEQUENCES, SEQ_LENGTH, hf_logits, max_error

LAYOUTS = [(1, 1, 1), (1, 1, 2), (2, 1, 1), (1, 2, 2)]  # (tp, pp, ep)
HF_DIR_LAYOUT = (1, 2, 2)


def main() -> None:
    out_path, specs = sys.argv[1], [arg.split("=", 1) for arg in sys.argv[2:]]
    tokens_BS = torch.randint(0, 700, (NUM_SEQUENCES, SEQ_LENGTH), generator=torch.Generator().manual_seed(0))
    expected = {name: hf_logits(dirs.split(",")[0], tokens_BS) for name, dirs in specs}  # before compat (see there)
    init_distributed()
    results = {name: {} for name, _ in specs}
    for tp, pp, ep in LAYOUTS:
        dims = ParallelDims.of_sizes(dist.get_world_size(), tp, pp, ep_size=ep)
        ctx = init_parallel(dims, seed=0)
        for name, dirs in specs:
            hf_dir, megatron_dir = dirs.split(",")
            results[name][f"megatron tp{tp}pp{pp}ep{ep}"] = max_error(megatron_dir, expected[name], tokens_BS, ctx)
            if (tp, pp, ep) == HF_DIR_LAYOUT:
                results[name][f"hf tp{tp}pp{pp}ep{ep}"] = max_error(hf_dir, expected[name], tokens_BS, ctx)
    if dist.get_rank() == 0:
        with open(out_path, "w") as handle:
            json.dump(results, handle, indent=1)
    shutdown()


if __name__ == "__main__":
    main()
