"""Benchmark DPO steps on synthetic preference data; prints JSON (rank 0).

    python scripts/benchmark.py --hidden 256 --layers 4 --lengths mix --max-length 512
    torchrun --nproc_per_node=4 scripts/benchmark.py --hidden 256 \
        policy.megatron_cfg.tensor_model_parallel_size=2 policy.megatron_cfg.pipeline_model_parallel_size=2
    python scripts/benchmark.py --hidden 256 --variant padded: --variant packed:data.packing=true

Variants (default: padded, packed, prefix-shared, prefix-shared with a cached
reference) alternate step by step; see megatron_dpo/perf/bench.py.
"""

from megatron_dpo.perf.timing import CommTimer


def main() -> None:
    comm = CommTimer().install()  # before megatron-core is imported: it keeps references to these calls
    from megatron_dpo.cli import _quiet_library_warnings
    from megatron_dpo.parallel.init import shutdown
    from megatron_dpo.perf.bench import main as benchmark

    _quiet_library_warnings()
    benchmark(comm)
    shutdown()


if __name__ == "__main__":
    main()
