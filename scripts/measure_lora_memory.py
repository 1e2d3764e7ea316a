"""Peak RSS and checkpoint size of full DPO vs LoRA DPO on one CPU process.

    python scripts/measure_lora_memory.py WORK_DIR [--steps 2] [--rank 16]

Writes a random Hugging Face Llama of ~114M parameters (hidden 768, 12
layers, intermediate 3072, vocab 768, 12 heads) to WORK_DIR/hf, then runs
scripts/run_dpo.py on it twice (fp32, reference.mode=online, a checkpoint at
the end): full DPO, and LoRA (rank --rank on every linear). Each run is a
child process; its peak RSS is the kernel's high-water mark (wait4's
ru_maxrss). Prints one JSON object with both runs' numbers.
"""

import argparse
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = dict(vocab_size=768, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
             num_key_value_heads=12, max_position_embeddings=2048, bos_token_id=1, eos_token_id=2,
             tie_word_embeddings=False)


def directory_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(root, name)) for root, _, names in os.walk(path) for name in names)


def run(work_dir: str, name: str, steps: int, extra) -> dict:
    run_dir = os.path.join(work_dir, name)
    command = [sys.executable, os.path.join(REPO, "scripts", "run_dpo.py"), "--config",
               os.path.join(REPO, "configs", "dpo.yaml"), f"policy.model_name={work_dir}/hf",
               "policy.precision=float32", "policy.max_total_sequence_length=64", "policy.train_global_batch_size=8",
               "policy.train_micro_batch_size=4", f"dpo.max_num_steps={steps}", "data.val_data_path=null",
               "dpo.val_at_start=false", "dpo.val_at_end=false", "dpo.val_period=0", "logger.tensorboard_enabled=false",
               "logger.plot_enabled=false", f"checkpointing.checkpoint_dir={run_dir}", "checkpointing.resume=never",
               *extra]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"), CUDA_VISIBLE_DEVICES="")
    log_path = os.path.join(work_dir, f"{name}.log")
    with open(log_path, "w") as log:
        child = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(child.pid, 0)  # reaped here: its rusage is the run's alone
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        raise SystemExit(f"{name} run failed: see {log_path}")
    step = os.path.join(run_dir, f"step_{steps}")
    return {"peak_rss_bytes": usage.ru_maxrss * 1024, "policy_bytes": directory_bytes(os.path.join(step, "policy")), "step_dir_bytes": directory_bytes(step),
            "metrics": [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))][-1]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("work_dir")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--rank", type=int, default=16)
    args = parser.parse_args()
    sys.path.insert(0, REPO)
    from tests.hf_models import save_hf_model

    hf_dir = os.path.join(args.work_dir, "hf")
    if not os.path.isdir(hf_dir):
        save_hf_model(hf_dir, "llama", **MODEL)
    num_params = 12 * (4 * 768**2 + 3 * 768 * 3072 + 2 * 768) + 2 * 768 * 768 + 768
    lora = ["policy.lora_cfg.enabled=true", f"policy.lora_cfg.dim={args.rank}", f"policy.lora_cfg.alpha={2 * args.rank}",
            "policy.lora_cfg.target_modules=[linear_qkv,linear_proj,linear_fc1,linear_fc2]"]
    results = {"num_parameters": num_params}
    for name, extra in (("full", []), ("lora", lora)):
        results[name] = run(args.work_dir, name, args.steps, extra)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
