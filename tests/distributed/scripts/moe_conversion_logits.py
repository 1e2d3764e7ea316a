"""Logits of HF Mixture-of-Experts models loaded into megatron vs transformers.

    torchrun --nproc_per_node=4 tests/distributed/scripts/moe_conversion_logits.py OUT.json NAME=HF_DIR,MEGATRON_DIR ...

Each model's converted megatron_dpo checkpoint is built through checkpoint.source
+ build + load_source_weights under EP1, EP2, TP2 and EP2 x PP2 (data
parallelism fills the other ranks), the HF directory itself under EP2 x PP2,
and compared as in conversion_logits.py. Rank 0 writes
{NAME: {"<source> tp<T>pp<P>ep<E>": max abs error}}.
"""

from tests.distributed.scripts.conversion_logits import compare

LAYOUTS = [dict(), dict(ep_size=2), dict(tp_size=2), dict(pp_size=2, ep_size=2)]  # ParallelDims.of_sizes arguments
HF_DIR_LAYOUT = dict(pp_size=2, ep_size=2)


def main() -> None:
    compare(LAYOUTS, HF_DIR_LAYOUT,
            lambda layout: "tp{}pp{}ep{}".format(layout.get("tp_size", 1), layout.get("pp_size", 1),
                                                 layout.get("ep_size", 1)))


if __name__ == "__main__":
    main()
