"""Check a GPU machine in one command (scripts/gpu_check.sh); prints one JSON summary.

Each check returns {"name", "status": "pass" | "fail" | "not_run", "detail"}
and the exit code is 1 if any failed. On a GPU, the model is ~1B Llama-shaped
(hidden 2048, 16 layers, 32 heads over 8 query groups, vocab 32000) in bf16;
``--dry-run`` runs the same code on the CPU at tiny size in fp32, and reports
the checks that need a GPU as not_run, with the reason.

Checks: versions; the kernel plan (TE spec, fusions, prefix attention); TE
layers with bf16 parameters; fusions on in the built model; step-1 loss ln 2
for padded, packed, prefix-shared and cached batches; per-sequence log-probs
of padded, packed and prefix-shared batches agree (fp32: 1e-5 relative;
bf16: ``BF16_LOGP_TOLERANCE`` of the mean |log-prob|); host syncs per step
(``torch.cuda.set_sync_debug_mode``): packed and prefix-shared no more than
padded; tokens/s per batch form (perf/bench.py: variants take turns on the
same batches) and MFU against the detected GPU's datasheet bf16 dense peak;
validate-config's memory estimate, and on a GPU the measured peak against it;
a checkpoint written by a CPU process loads here and trains.
"""

import argparse
import gc
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from typing import Callable, Dict, List

import torch

from megatron_dpo.config import load_config
from megatron_dpo.data import make_microbatches
from megatron_dpo.models.build import unwrap
from megatron_dpo.models.kernels import PREFIX_TE_THD, detect_env, fusion_settings, resolve_kernels
from megatron_dpo.models.memory import GIB, estimate_memory
from megatron_dpo.parallel.init import get_device, init_distributed, shutdown
from megatron_dpo.perf import bench
from megatron_dpo.perf.timing import CommTimer
from megatron_dpo.train.schedule import reference_pass
from megatron_dpo.train.setup import setup_run
from megatron_dpo.train.step import train_step

REPO = bench.REPO
# Datasheet bf16 dense tensor-core peaks, FLOP/s (no sparsity).
DATASHEET_BF16 = {"H200": 989e12, "H100 SXM": 989e12, "H100 PCIe": 756e12, "A100": 312e12}
BF16_LOGP_TOLERANCE = 2e-2  # max |difference| over mean |log-prob| of a sequence
FP32_LOGP_TOLERANCE = 1e-5
GPU_MODEL = ["--hidden", "2048", "--layers", "16", "--heads", "32", "--query-groups", "8", "--ffn", "8192",
             "--vocab", "32000", "--max-length", "1024", "--global-batch", "16", "--micro-batch", "4",
             "--warmup", "1", "--steps", "3"]
CPU_MODEL = ["--hidden", "64", "--layers", "2", "--heads", "4", "--query-groups", "2", "--max-length", "64",
             "--global-batch", "4", "--micro-batch", "2", "--warmup", "0", "--steps", "1"]
# Variants run two at a time on a GPU: four 1B runs (policy, reference, Adam) would not fit 80 GB.
GROUPS = (("padded", "packed"), ("shared", "shared_cached"))
TINY_RUN = ["policy.model_name=tiny-llama", "policy.precision=float32", "policy.max_total_sequence_length=64",
            "policy.train_global_batch_size=4", "policy.train_micro_batch_size=2", "dpo.val_at_start=false",
            "dpo.val_at_end=false", "dpo.val_period=0", "logger.tensorboard_enabled=false",
            "logger.plot_enabled=false"]


def result(name: str, status: str, **detail) -> dict:
    return {"name": name, "status": status, **detail}


def not_run(name: str) -> dict:
    return result(name, "not_run", reason="needs a CUDA GPU (dry run on CPU)")


def datasheet_peak(device_name: str):
    """The bf16 dense peak of a known GPU (FLOP/s), or None."""
    name = device_name.upper()
    if "H200" in name:
        return DATASHEET_BF16["H200"]
    if "H100" in name and "PCIE" in name:
        return DATASHEET_BF16["H100 PCIe"]
    if "H100" in name and ("SXM" in name or "HBM3" in name):
        return DATASHEET_BF16["H100 SXM"]
    if "A100" in name:
        return DATASHEET_BF16["A100"]
    return None


def check_versions(gpu: bool) -> dict:
    import importlib.metadata as metadata

    from megatron_dpo.parallel.compat import SUPPORTED_MEGATRON_CORE

    def version(name):
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    found = {"python": sys.version.split()[0], "torch": torch.__version__, "megatron-core": version("megatron-core"),
             "transformer-engine": version("transformer-engine") or version("transformer_engine"),
             "cuda": torch.version.cuda, "device": torch.cuda.get_device_name() if gpu else "cpu"}
    problems = []
    if found["megatron-core"] != SUPPORTED_MEGATRON_CORE:
        problems.append(f"megatron-core {found['megatron-core']} != {SUPPORTED_MEGATRON_CORE}")
    if gpu and not found["transformer-engine"]:
        problems.append("Transformer Engine missing: pip install -e '.[gpu]'")
    return result("versions", "fail" if problems else "pass", versions=found, problems=problems)


def check_kernel_plan(cfg, gpu: bool) -> dict:
    plan = resolve_kernels(fusion_settings(cfg.policy.megatron_cfg), detect_env())
    want = ("transformer_engine", PREFIX_TE_THD) if gpu else ("local", "SDPA")
    ok = (plan.layer_spec, plan.prefix_attention) == want and (gpu or not any(plan.fusions.values()))
    return result("kernel_plan", "pass" if ok else "fail", plan=plan.describe(), expected=list(want))


def te_spec_facts(run) -> dict:
    """What the built policy holds: attention and QKV classes, parameter dtypes, fusions."""
    from megatron.core.extensions.transformer_engine import TEDotProductAttention

    from megatron_dpo.models.kernels import FUSIONS

    gpt = unwrap(run.policy[0])
    attention = gpt.decoder.layers[0].self_attention
    return {"core_attention": type(attention.core_attention).__name__,
            "te_attention": isinstance(attention.core_attention, TEDotProductAttention),
            "linear_qkv": type(attention.linear_qkv).__name__,
            "param_dtypes": sorted({str(p.dtype) for p in gpt.parameters()}),
            "fusions": {name: bool(getattr(gpt.config, name)) for name in FUSIONS}}


def spec_checks(facts: Dict[str, dict]) -> List[dict]:
    te_bf16 = all(f["te_attention"] and f["linear_qkv"].startswith("TE") and f["param_dtypes"] == ["torch.bfloat16"]
                  for f in facts.values())
    # gradient_accumulation_fusion also needs apex's fused wgrad kernel (models/kernels.py).
    required = [name for name in next(iter(facts.values()))["fusions"]
                if name != "gradient_accumulation_fusion" or detect_env().wgrad_kernel]
    fused = all(f["fusions"][name] for f in facts.values() for name in required)
    return [result("te_spec_bf16", "pass" if te_bf16 else "fail",
                   runs={name: {k: v for k, v in f.items() if k != "fusions"} for name, f in facts.items()}),
            result("fusions_on", "pass" if fused else "fail", required=required,
                   built={name: f["fusions"] for name, f in facts.items()})]


def sequence_logps(run, forms: Dict[str, List[dict]]) -> Dict[str, torch.Tensor]:
    out = {}
    for name, microbatches in forms.items():
        device_batches = [{k: v.to(get_device()) if torch.is_tensor(v) else v for k, v in batch.items()}
                          for batch in microbatches]
        logps = reference_pass(run.policy, device_batches, device_batches[0]["tokens"].shape[1], run.arch.vocab_size)
        out[name] = torch.cat(logps).float().cpu()
    return out


def check_logprob_agreement(run, pairs, gpu: bool) -> dict:
    """The prefix-shared run's model on the same pairs in three batch forms."""
    forms = {name: make_microbatches(pairs, run.micro_batch_size, run.pad_id, packing, sharing)
             for name, packing, sharing in (("padded", False, False), ("packed", True, False),
                                            ("shared", False, True))}
    logps = sequence_logps(run, forms)
    scale = logps["padded"].abs().mean().item()
    differences = {name: (logps[name] - logps["padded"]).abs().max().item() / scale for name in ("packed", "shared")}
    tolerance = BF16_LOGP_TOLERANCE if gpu else FP32_LOGP_TOLERANCE
    status = "pass" if all(d <= tolerance for d in differences.values()) else "fail"
    return result("logprob_agreement", status, max_difference_over_mean_abs_logp=differences,
                  tolerance=tolerance, sequences=len(logps["padded"]), mean_abs_logp=round(scale, 3))


def count_host_syncs(step: Callable[[], object]) -> int:
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def ln2_check(losses: Dict[str, float], gpu: bool) -> dict:
    tolerance = 5e-3 if gpu else 1e-6  # bf16 kernels round policy and reference alike, not bit-exactly
    errors = {name: abs(loss - math.log(2)) for name, loss in losses.items()}
    return result("step1_loss_ln2", "pass" if all(e <= tolerance for e in errors.values()) else "fail",
                  preference_loss=losses, tolerance=tolerance)


def run_group(args, names, cache_dir, gpu: bool, checks: dict, facts: dict, first_step: dict, syncs: dict,
              summaries: dict):
    """Set up these variants, run the per-run checks on their first step, then time them."""
    configs = {name: cfg for name, cfg in bench.variant_configs(args, cache_dir).items() if name in names}
    runs = bench.setup_runs(args, configs)
    if gpu:
        facts.update({name: te_spec_facts(run) for name, run in runs.items()})
    if "shared" in runs:
        pairs = bench.rank_pairs(runs["shared"], 0, args.global_batch)
        checks["logprob_agreement"] = [check_logprob_agreement(runs["shared"], pairs, gpu)]
    for name, run in runs.items():
        pairs = bench.rank_pairs(run, 0, args.global_batch)
        first_step[name] = train_step(run, pairs)["preference_loss"]
        if gpu:
            syncs[name] = count_host_syncs(lambda run=run, pairs=pairs: train_step(run, pairs))
    records, peaks, memory = bench.run_rounds(args, runs, CommTimer())
    peak = sorted(peaks)[len(peaks) // 2]
    for name in runs:
        summaries[name] = bench.summarise(args, runs[name], records[name], peak, memory[name])
    runs.clear()  # the next group's runs need the memory: free these (reference cycles too) first
    gc.collect()
    if gpu:
        torch.cuda.empty_cache()


def throughput_checks(summaries: dict, gpu: bool) -> List[dict]:
    rates = {name: {key: s[key] for key in ("tokens_per_s", "step_time_s", "achieved_gflop_per_s", "step_memory_mb")}
             for name, s in summaries.items()}
    ok = all(r["tokens_per_s"] > 0 for r in rates.values()) and len(rates) == 4
    checks = [result("throughput", "pass" if ok else "fail", variants=rates)]
    if not gpu:
        return checks + [not_run("mfu")]
    device = torch.cuda.get_device_name()
    peak = datasheet_peak(device)
    if peak is None:
        return checks + [result("mfu", "not_run", reason=f"no datasheet bf16 peak known for {device!r}")]
    mfu = {name: round(s["achieved_gflop_per_s"] * 1e9 / peak, 3) for name, s in summaries.items()}
    return checks + [result("mfu", "pass" if all(v > 0 for v in mfu.values()) else "fail", device=device,
                            datasheet_bf16_tflops=peak / 1e12, mfu=mfu)]


def memory_checks(args, cache_dir, gpu: bool) -> List[dict]:
    """validate-config's estimate for the padded variant; on a GPU, one padded run alone measured against it."""
    cfg = bench.variant_configs(args, cache_dir)["padded"]
    source = bench.synthetic_source(args)
    if not gpu:
        from megatron_dpo.parallel.dims import ParallelDims

        estimate = estimate_memory(source.arch, cfg, ParallelDims.of_sizes(1))
        return [result("memory_estimate", "pass" if estimate.total_bytes > 0 else "fail",
                       estimate_gib=round(estimate.total_bytes / GIB, 3)), not_run("peak_memory")]
    (run,) = bench.setup_runs(args, {"padded": cfg}).values()
    estimate = estimate_memory(run.arch, run.cfg, run.dims)
    # max_memory_allocated holds no CUDA context, workspaces or NCCL buffers: compare without that row.
    allocatable = sum(size for what, size in estimate.rows if not what.startswith("CUDA context"))
    torch.cuda.reset_peak_memory_stats()
    train_step(run, bench.rank_pairs(run, 0, args.global_batch))
    peak = torch.cuda.max_memory_allocated()
    return [result("memory_estimate", "pass", estimate_gib=round(estimate.total_bytes / GIB, 2)),
            result("peak_memory", "pass" if peak <= allocatable else "fail", peak_allocated_gib=round(peak / GIB, 2),
                   estimate_without_runtime_gib=round(allocatable / GIB, 2), ratio=round(peak / allocatable, 3))]


def start_cpu_checkpoint(directory: str) -> subprocess.Popen:
    """A CPU process (no GPU visible) trains one step of the tiny model and saves it."""
    env = {key: value for key, value in os.environ.items()  # a world of its own, not this process's
           if key not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    command = [sys.executable, os.path.join(REPO, "scripts", "run_dpo.py"), "--config",
               os.path.join(REPO, "configs", "dpo.yaml"), *TINY_RUN, f"checkpointing.checkpoint_dir={directory}",
               "dpo.max_num_steps=1", "checkpointing.save_period=1"]
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def check_cpu_checkpoint(writer: subprocess.Popen, directory: str, scratch: str) -> dict:
    """The CPU-written step loads here (this process's device) and trains two steps."""
    output, _ = writer.communicate(timeout=600)
    step_dir = os.path.join(directory, "step_1")
    if writer.returncode != 0 or not os.path.isdir(step_dir):
        return result("cpu_checkpoint_loads_and_trains", "fail", reason="the CPU run did not save step_1",
                      output_tail=output[-2000:])
    cfg = load_config(os.path.join(REPO, "configs", "dpo.yaml"), TINY_RUN + [
        f"policy.model_name={step_dir}", f"checkpointing.checkpoint_dir={scratch}", "checkpointing.enabled=false"])
    run = setup_run(cfg, use_run_dir=False)
    batch = cfg.policy.train_global_batch_size
    losses = [train_step(run, run.train_data.pairs[i * batch:(i + 1) * batch])["preference_loss"] for i in range(2)]
    ok = abs(losses[0] - math.log(2)) < 5e-3 and all(math.isfinite(loss) for loss in losses)
    return result("cpu_checkpoint_loads_and_trains", "pass" if ok else "fail", device=str(get_device()),
                  preference_loss=losses)


def run_checks(dry_run: bool) -> List[dict]:
    gpu = not dry_run
    if gpu and not torch.cuda.is_available():
        return [result("cuda", "fail", reason="no CUDA GPU visible; on a CPU machine run --dry-run")]
    args = bench.parse_args(GPU_MODEL if gpu else CPU_MODEL)
    checks: Dict[str, List[dict]] = {}
    facts, first_step, syncs, summaries = {}, {}, {}, {}
    with tempfile.TemporaryDirectory() as scratch:
        writer = start_cpu_checkpoint(os.path.join(scratch, "cpu_run"))  # runs beside the checks below
        init_distributed()
        cache_dir = os.path.join(scratch, "reference_cache")
        checks["versions"] = [check_versions(gpu)]
        checks["kernel_plan"] = [check_kernel_plan(bench.variant_configs(args, cache_dir)["shared"], gpu)]
        for names in GROUPS:
            run_group(args, names, cache_dir, gpu, checks, facts, first_step, syncs, summaries)
        checks["step1_loss_ln2"] = [ln2_check(first_step, gpu)]
        if gpu:
            checks["spec"] = spec_checks(facts)
            ok = syncs["packed"] <= syncs["padded"] and syncs["shared"] <= syncs["padded"]
            checks["host_syncs"] = [result("host_syncs", "pass" if ok else "fail", per_step=syncs)]
        checks["throughput"] = throughput_checks(summaries, gpu)
        checks["memory"] = memory_checks(args, cache_dir, gpu)
        checks["checkpoint"] = [check_cpu_checkpoint(writer, os.path.join(scratch, "cpu_run"),
                                                     os.path.join(scratch, "load_run"))]
    flat = [check for group in checks.values() for check in group]
    if not gpu:
        flat += [not_run(name) for name in ("te_spec_bf16", "fusions_on", "host_syncs")]
    return flat


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="on the CPU, tiny model; GPU checks not run")
    parser.add_argument("--out", help="also write the JSON summary here")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        checks = run_checks(args.dry_run)
    except Exception as error:  # a crash is a failed check, reported in the same JSON
        checks = [result("gpu_check", "fail", error=f"{type(error).__name__}: {error}",
                         traceback=traceback.format_exc()[-3000:])]
    finally:
        shutdown()
    summary = {"mode": "dry-run" if args.dry_run else "gpu", "wall_s": round(time.perf_counter() - start, 1),
               "failed": [c["name"] for c in checks if c["status"] == "fail"], "checks": checks}
    text = json.dumps(summary, indent=1)
    if args.out:
        with open(args.out, "w") as handle:
            handle.write(text + "\n")
    print(text, flush=True)
    return 1 if summary["failed"] else 0
