"""Benchmark DPO steps: throughput, step-time split, model FLOPs, MFU, memory.

Each variant (``--variant name:key=value,...``; config overrides on top of the
shared ones) is a run of its own, set up once. Then the variants take turns
step by step on the same batches of synthetic pairs (perf/synthetic.py): drift
in machine load hits them alike, and each ratio is the median of per-step
ratios. A dense-matmul peak sample is taken every round (perf/flops.py).
Memory is measured in one more, untimed step per variant. Rank 0 prints one
JSON object. All variants share one parallel layout.
"""

import argparse
import copy
import json
import os
import resource
import statistics
import tempfile
from typing import Dict, List

import torch

from megatron_dpo.checkpoint.source import ModelSource, resolve_source
from megatron_dpo.config import load_config
from megatron_dpo.data import TokenizeResult, make_microbatches
from megatron_dpo.models.architecture import ModelArchitecture
from megatron_dpo.models.presets import TINY_TOKENIZER_DIR
from megatron_dpo.parallel.init import get_device, init_distributed
from megatron_dpo.perf.flops import matmul_params, matmul_peak, step_flops
from megatron_dpo.perf.synthetic import LENGTH_CHOICES, synthetic_pairs
from megatron_dpo.perf.timing import CommTimer, PeakRss, PhaseTimer
from megatron_dpo.train.setup import setup_run
from megatron_dpo.train.step import train_step

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_VARIANTS = (
    "padded:", "packed:data.packing=true", "shared:data.prefix_sharing=true",
    "shared_cached:data.prefix_sharing=true,reference.mode=cached",
)
DEFAULT_COMPARE = ("packed/padded", "shared/padded", "shared_cached/shared", "shared_cached/padded")
TINY_VOCAB = 768  # the built-in tiny tokenizer's


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=os.path.join(REPO, "configs", "dpo.yaml"))
    model = parser.add_argument_group("synthetic model (default: policy.model_name)")
    model.add_argument("--hidden", type=int)
    model.add_argument("--layers", type=int, default=4)
    model.add_argument("--heads", type=int, help="default: hidden / 64")
    model.add_argument("--query-groups", type=int, help="default: heads")
    model.add_argument("--ffn", type=int, help="default: 8/3 x hidden, rounded up to 64")
    model.add_argument("--vocab", type=int, default=TINY_VOCAB)
    parser.add_argument("--lengths", choices=LENGTH_CHOICES, default="mix")
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--global-batch", type=int, default=16, help="pairs per step")
    parser.add_argument("--micro-batch", type=int, default=8, help="pairs per micro-batch")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--peak-size", type=int, help="matmul side; default 2048 CPU, 8192 GPU")
    parser.add_argument("--variant", action="append", help="name:key=value,...; repeatable")
    parser.add_argument("--compare", action="append", help="a/b: tokens/s of variant a over b")
    parser.add_argument("overrides", nargs="*", help="config key=value for every variant")
    return parser.parse_args(argv)


def synthetic_source(args) -> ModelSource:
    heads = args.heads or args.hidden // 64
    arch = ModelArchitecture(
        num_layers=args.layers, hidden_size=args.hidden,
        ffn_hidden_size=args.ffn or -(-8 * args.hidden // 3 // 64) * 64,
        num_attention_heads=heads, num_query_groups=args.query_groups or heads, vocab_size=args.vocab,
        max_position_embeddings=max(4096, 2 * args.max_length),
    )
    return ModelSource("preset", "synthetic", arch, TINY_TOKENIZER_DIR)


def variant_configs(args, cache_dir: str) -> Dict[str, object]:
    precision = "bfloat16" if torch.cuda.is_available() else "float32"
    shared = [
        f"policy.precision={precision}", "data.val_data_path=null", "checkpointing.enabled=false",
        "logger.tensorboard_enabled=false", "logger.plot_enabled=false", f"reference.cache_dir={cache_dir}",
        f"policy.max_total_sequence_length={args.max_length}",
        f"policy.train_global_batch_size={args.global_batch}", f"policy.train_micro_batch_size={args.micro_batch}",
    ] + args.overrides
    configs = {}
    for spec in args.variant or DEFAULT_VARIANTS:
        name, _, settings = spec.partition(":")
        configs[name] = load_config(args.config, shared + [item for item in settings.split(",") if item])
    return configs


def setup_runs(args, configs) -> Dict[str, object]:
    """One run per variant, each with its own copy of the same synthetic pairs."""
    first = next(iter(configs.values()))
    source = synthetic_source(args) if args.hidden else resolve_source(first.policy)
    pairs = synthetic_pairs(args.global_batch * (args.warmup + args.steps), args.lengths, args.max_length,
                            source.arch.vocab_size, first.dpo.seed)
    runs = {}
    for name, cfg in configs.items():
        datasets = {"train": TokenizeResult(copy.deepcopy(pairs), num_dropped=0, num_truncated=0)}
        runs[name] = setup_run(cfg, source, datasets, use_run_dir=False)
    layouts = {tuple(run.dims.sizes().items()) for run in runs.values()}
    if len(layouts) > 1:
        raise ValueError(f"variants must share one parallel layout; got {layouts}")
    return runs


def global_pairs(run, step: int, global_batch: int):
    """Step ``step``'s global batch: the next ``global_batch`` pairs."""
    return run.train_data.pairs[step * global_batch:(step + 1) * global_batch]


def rank_pairs(run, step: int, global_batch: int):
    """This DP rank's share of step ``step``'s global batch."""
    return global_pairs(run, step, global_batch)[run.dims.dp_rank::run.dims.dp_size]


def timed_step(run, pairs, comm: CommTimer) -> dict:
    """One train step with its phase and communication times."""
    comm.reset()
    timer = PhaseTimer()
    metrics = train_step(run, pairs, timer)
    record = {"step_time": metrics["step_time"], "tokens": metrics["num_tokens"], "comm": comm.seconds}
    record.update(timer.seconds)
    return record


def step_memory_mb(run, pairs) -> float:
    """Peak memory of one more (untimed) step: GPU peak allocated; CPU the RSS
    rise during the step (PeakRss samples from a thread, which would perturb
    the timed steps)."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        train_step(run, pairs)
        return torch.cuda.max_memory_allocated() / 2**20
    with PeakRss() as rss:
        train_step(run, pairs)
    return (rss.peak - rss.start) / 2**20


def run_rounds(args, runs, comm: CommTimer):
    records = {name: [] for name in runs}
    peaks = []
    names = list(runs)
    for step in range(args.warmup + args.steps):
        peaks.append(matmul_peak(get_device(), args.peak_size or (8192 if torch.cuda.is_available() else 2048)))
        for name in names[step % len(names):] + names[:step % len(names)]:
            record = timed_step(runs[name], rank_pairs(runs[name], step, args.global_batch), comm)
            if step >= args.warmup:
                records[name].append(dict(record, step=step))
    memory = {name: step_memory_mb(run, rank_pairs(run, args.warmup, args.global_batch))
              for name, run in runs.items()}
    return records, peaks, memory


def _median(records: List[dict], key: str) -> float:
    return statistics.median(record.get(key, 0.0) for record in records)


def summarise(args, run, records: List[dict], peak_median: float, memory_mb: float) -> dict:
    """One variant's numbers: per-step rates as medians over the measured steps."""
    data = run.cfg.data
    flops = [step_flops(run.arch, global_pairs(run, r["step"], args.global_batch), data.prefix_sharing,
                        bool(run.reference)) for r in records]
    achieved = statistics.median(f.total / r["step_time"] for f, r in zip(flops, records))
    slots = sum(batch["tokens"].numel() for batch in make_microbatches(
        rank_pairs(run, records[0]["step"], args.global_batch), run.micro_batch_size, run.pad_id,
        data.packing, data.prefix_sharing))
    phases = {key: round(_median(records, key), 4) for key in ("reference", "policy", "optimizer", "comm")}
    phases["other"] = round(_median(records, "step_time") - phases["reference"] - phases["policy"]
                            - phases["optimizer"], 4)
    return {
        "overrides": {"packing": data.packing, "prefix_sharing": data.prefix_sharing,
                      "reference_mode": run.cfg.reference.mode},
        "tokens_per_s": round(statistics.median(r["tokens"] / r["step_time"] for r in records), 1),
        "pairs_per_s": round(statistics.median(args.global_batch / r["step_time"] for r in records), 3),
        "step_time_s": round(_median(records, "step_time"), 4),
        "phases_s_median": phases,
        "computed_tokens_per_pass": round(statistics.mean(f.tokens for f in flops)),
        "row_slots_first_step_rank0": slots,
        "model_gflop_per_step": round(statistics.mean(f.total for f in flops) / 1e9, 2),
        "achieved_gflop_per_s": round(achieved / 1e9, 2),
        "mfu": round(achieved / peak_median, 3),
        "step_memory_mb": round(memory_mb, 1),
    }


def paired_speedup(records: Dict[str, List[dict]], faster: str, slower: str) -> float:
    """Median over steps of the tokens/s ratio (same batch, adjacent in time)."""
    return round(statistics.median(b["step_time"] / a["step_time"]
                                   for a, b in zip(records[faster], records[slower])), 3)


def report(args, runs, records, peaks, memory) -> dict:
    run = next(iter(runs.values()))
    peak_rank = torch.tensor([statistics.median(peaks), max(peaks)], dtype=torch.float64, device=get_device())
    torch.distributed.all_reduce(peak_rank)  # each rank measured its own share of the machine
    peak_median, peak_max = peak_rank.tolist()
    arch = run.arch
    return {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "threads_per_rank": torch.get_num_threads(),
        "world_size": run.dims.world_size,
        "layout": {"tp": run.dims.tp_size, "pp": run.dims.pp_size, "dp": run.dims.dp_size},
        "model": dict(arch.to_dict(), matmul_params=matmul_params(arch), precision=run.cfg.policy.precision),
        "data": {"lengths": args.lengths, "max_length": args.max_length, "global_batch_pairs": args.global_batch,
                 "micro_batch_pairs": args.micro_batch, "warmup_steps": args.warmup, "measured_steps": args.steps},
        "matmul_peak_gflop_per_s": {"median": round(peak_median / 1e9, 1), "max": round(peak_max / 1e9, 1),
                                    "size": args.peak_size or (8192 if torch.cuda.is_available() else 2048)},
        "variants": {name: summarise(args, runs[name], records[name], peak_median, memory[name]) for name in runs},
        "speedup_tokens_per_s": {pair: paired_speedup(records, *pair.split("/"))
                                 for pair in args.compare or DEFAULT_COMPARE
                                 if all(name in runs for name in pair.split("/"))},
        "process_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "notes": "rates are medians over the measured steps; tokens_per_s counts non-pad tokens of "
                 "chosen + rejected (the prompt twice, as the padded form holds it); mfu = achieved / "
                 "median matmul peak (all ranks); phases are rank 0's; comm is time inside "
                 "torch.distributed calls, included in the phases; step_memory_mb (one extra step, rank 0): "
                 "GPU peak allocated, CPU peak RSS rise during the step.",
    }


def main(comm: CommTimer, argv=None) -> None:
    args = parse_args(argv)
    init_distributed()
    with tempfile.TemporaryDirectory() as cache_dir:
        configs = variant_configs(args, cache_dir)
        runs = setup_runs(args, configs)
        records, peaks, memory = run_rounds(args, runs, comm)
        result = report(args, runs, records, peaks, memory)
    if torch.distributed.get_rank() == 0:
        print(json.dumps(result, indent=1), flush=True)
