"""Per-rank peak RSS of one policy save (model + distributed optimizer), at
DP1 and DP2, for each checkpointing.optimizer_format, on CPU.

    python scripts/measure_save_memory.py WORK_DIR [--hidden 1024 --layers 8 --vocab 32000]

Each (DP size, format) is one torchrun job (fp32 Llama: FFN 2.75 x hidden,
16 heads, 8 query groups; the distributed optimizer after one Adam step).
Each rank resets its RSS high-water mark (/proc/self/clear_refs, "5") right
before ``checkpoint.dist.save_policy`` and reads it (VmHWM) right after:
the save's own peak, over the RSS it started from. dist_checkpointing's
writer processes (forked per save) are not counted. Prints one JSON line per
job and a Markdown table.
"""

import argparse
import gc
import json
import os
import shutil
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FORMATS = ("dp_reshardable", "fully_reshardable")
MIB = 2**20


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as handle:
        line = next(line for line in handle if line.startswith(field + ":"))
    return int(line.split()[1]) * 1024  # kB


def _policy(args):
    """(dims, DDP chunks, distributed optimizer after one step) of the model."""
    from megatron_dpo.config.schema import MegatronConfig
    from megatron_dpo.models.architecture import ModelArchitecture
    from megatron_dpo.models.build import build_model
    from megatron_dpo.parallel.dims import ParallelDims
    from megatron_dpo.parallel.init import init_parallel
    from megatron_dpo.train.optimizer import build_optimizer, wrap_ddp

    dims = init_parallel(ParallelDims.of_sizes(world_size=int(os.environ["WORLD_SIZE"])), seed=0)
    arch = ModelArchitecture(num_layers=args.layers, hidden_size=args.hidden, ffn_hidden_size=args.hidden * 11 // 4,
                             num_attention_heads=16, num_query_groups=8, vocab_size=args.vocab)
    megatron_cfg = MegatronConfig()
    megatron_cfg.optimizer.use_distributed_optimizer = True
    chunks = wrap_ddp(build_model(arch, dims), megatron_cfg)
    optimizer = build_optimizer(chunks, megatron_cfg, "float32", max_grad_norm=1.0)
    for chunk in chunks:
        chunk.zero_grad_buffer()
    optimizer.step()  # Adam's moments exist from the first step on
    return dims, chunks, optimizer


def worker(args) -> None:
    import torch
    import torch.distributed as dist

    from megatron_dpo.checkpoint.dist import save_policy
    from megatron_dpo.parallel.init import shutdown

    dims, chunks, optimizer = _policy(args)
    num_params = sum(p.numel() for chunk in chunks for p in chunk.parameters())
    out = os.path.join(args.work_dir, f"dp{dims.dp_size}_{args.format}")
    if dims.rank == 0:
        shutil.rmtree(out, ignore_errors=True)
        os.makedirs(out)
    gc.collect()
    dist.barrier()
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")  # VmHWM := VmRSS
    start = _status_bytes("VmRSS")
    save_policy(chunks, optimizer, out, args.format)
    peak = _status_bytes("VmHWM")
    ranks = [None] * dist.get_world_size()
    dist.all_gather_object(ranks, {"rank": dims.rank, "start_rss_mib": start / MIB, "peak_rss_mib": peak / MIB,
                                   "save_extra_mib": (peak - start) / MIB})
    if dims.rank == 0:
        print("RESULT " + json.dumps({"dp": dims.dp_size, "format": args.format, "params": num_params,
                                      "torch_threads": torch.get_num_threads(), "ranks": ranks}), flush=True)
    shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("work_dir")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--format", choices=FORMATS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", PYTHONPATH=REPO)
    rows = []
    for dp in (1, 2):
        for fmt in FORMATS:
            command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={dp}", "--standalone",
                       os.path.abspath(__file__), args.work_dir, "--worker", "--format", fmt, "--hidden",
                       str(args.hidden), "--layers", str(args.layers), "--vocab", str(args.vocab)]
            result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
            lines = [line[len("RESULT "):] for line in result.stdout.splitlines() if line.startswith("RESULT ")]
            if result.returncode != 0 or not lines:
                raise SystemExit(f"DP{dp} {fmt} failed:\n{result.stderr[-4000:]}")
            print(lines[0], flush=True)
            rows.append(json.loads(lines[0]))
    print(f"\n{rows[0]['params'] / 1e6:.0f}M parameters, fp32, distributed optimizer; MiB per rank")
    print("| DP | optimizer_format | RSS before save | peak during save | save's extra |")
    print("|---|---|---|---|---|")
    for row in rows:
        for rank in row["ranks"]:
            print(f"| {row['dp']} (rank {rank['rank']}) | {row['format']} | {rank['start_rss_mib']:.0f} | "
                  f"{rank['peak_rss_mib']:.0f} | {rank['save_extra_mib']:.0f} |")


# The guard matters: dist_checkpointing's writer re-imports the main module.
if __name__ == "__main__":
    main()
