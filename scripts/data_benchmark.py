"""Data-layer benchmark: synthetic text pairs -> tokenized cache -> warm restart
-> memory of a rank reading its pairs.

For each N of --num-pairs, each phase in a fresh process:
  1. write N synthetic plain-text pairs (JSONL) whose token lengths follow
     perf/synthetic.py's profiles (UltraFeedback-like by default), once;
  2. build: open_tokenized on an empty cache dir (tokenizes everything):
     seconds and the builder's peak RSS;
  3. warm restart: open_tokenized again (data + tokenizer fingerprints, open
     the memory-mapped table) and this rank's first step of the sampler;
  4. iterate: DP rank 0 of --dp-size reads every pair of its share of one
     epoch: peak RSS (VmHWM), and at the end RssAnon (the process's own
     memory) and RssFile (pages of the memory-mapped cache it touched,
     shared with every rank on the node, evictable).
Prints one JSON line per phase.

  python scripts/data_benchmark.py --num-pairs 100000 1000000 --workdir /tmp/data_bench
"""

import argparse
import json
import os
import random
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
TINY_TOKENIZER = os.path.join(ROOT, "megatron_dpo", "models", "presets", "tiny_tokenizer")
DEMO_DATA = os.path.join(ROOT, "data", "demo", "train.jsonl")


def memory() -> dict:
    """MiB of this process: peak RSS, now, own (anonymous) and file-backed."""
    fields = {}
    with open("/proc/self/status") as handle:
        for line in handle:
            name, _, value = line.partition(":")
            if name in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
                fields[name] = round(int(value.split()[0]) / 1024, 1)
    return fields


def write_pairs(path: str, num_pairs: int, lengths: str, seed: int) -> None:
    """Plain-text pairs; words from the demo data, as many as the sampled token length needs."""
    from transformers import AutoTokenizer

    from megatron_dpo.perf.synthetic import MIXES, PROFILES

    with open(DEMO_DATA) as handle:
        text = " ".join(" ".join(json.loads(line).values()) for line in handle)
    words = sorted({word for word in text.split() if word.isalpha()})
    tokenizer = AutoTokenizer.from_pretrained(TINY_TOKENIZER)
    sample = " ".join(random.Random(0).choices(words, k=5000))
    tokens_per_word = len(tokenizer(sample, add_special_tokens=False)["input_ids"]) / 5000
    rng = random.Random(seed)
    names = MIXES.get(lengths, (lengths,))

    def text_of(num_tokens: int) -> str:
        return " ".join(rng.choices(words, k=max(1, round(num_tokens / tokens_per_word))))

    with open(path + ".tmp", "w") as handle:
        for index in range(num_pairs):
            profile = PROFILES[names[index % len(names)]]
            record = {"prompt": f"<|user|>\n{text_of(profile.prompt.sample(rng))}\n<|assistant|>\n",
                      "chosen": text_of(profile.chosen.sample(rng)),
                      "rejected": text_of(profile.rejected.sample(rng))}
            handle.write(json.dumps(record) + "\n")
    os.rename(path + ".tmp", path)


def run_phase(args) -> dict:
    """One phase in this process (see the module docstring)."""
    start = time.perf_counter()
    from transformers import AutoTokenizer

    from megatron_dpo.config.schema import DataConfig
    from megatron_dpo.data import PairSampler, open_tokenized

    tokenizer = AutoTokenizer.from_pretrained(TINY_TOKENIZER)
    result = {"phase": args.phase, "num_pairs": args.num_pairs, "imports_s": round(time.perf_counter() - start, 2),
              "before_data": memory()}
    start = time.perf_counter()
    data = open_tokenized(args.data, DataConfig(), tokenizer, args.max_length, args.cache_dir)
    sampler = PairSampler(len(data), args.global_batch_size, 0, args.dp_size, shuffle=True, seed=0)
    first_step = next(iter(sampler))
    result["open_s"] = round(time.perf_counter() - start, 2)
    result.update(pairs=len(data), dropped=data.num_dropped, truncated=data.num_truncated)
    if args.phase == "iterate":
        start, num_read, num_tokens = time.perf_counter(), 0, 0
        sampler = PairSampler(len(data), args.global_batch_size, 0, args.dp_size, shuffle=True, seed=0)
        for indices in sampler:
            for pair in (data[i] for i in indices):
                num_read += 1
                num_tokens += len(pair.chosen_ids) + len(pair.rejected_ids)
        result.update(read_pairs=num_read, read_tokens=num_tokens, read_s=round(time.perf_counter() - start, 2))
    result.update(first_step_pairs=len(first_step), after=memory())
    return result


def run_in_fresh_process(phase: str, num_pairs: int, data: str, cache_dir: str, args) -> dict:
    command = [sys.executable, os.path.abspath(__file__), "--phase", phase, "--num-pairs", str(num_pairs),
               "--data", data, "--cache-dir", cache_dir, "--max-length", str(args.max_length),
               "--dp-size", str(args.dp_size), "--global-batch-size", str(args.global_batch_size)]
    start = time.perf_counter()
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    result = json.loads(output.strip().splitlines()[-1])
    result["process_s"] = round(time.perf_counter() - start, 2)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-pairs", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--workdir", default="/tmp/megatron_dpo_data_benchmark")
    parser.add_argument("--lengths", default="ultrafeedback", help="a perf/synthetic.py length profile")
    parser.add_argument("--max-length", type=int, default=2048)
    parser.add_argument("--dp-size", type=int, default=8)
    parser.add_argument("--global-batch-size", type=int, default=128)
    parser.add_argument("--phase", choices=["build", "warm", "iterate"], help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--cache-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase:
        args.num_pairs = args.num_pairs[0]
        print(json.dumps(run_phase(args)))
        return
    os.makedirs(args.workdir, exist_ok=True)
    for num_pairs in args.num_pairs:
        data = os.path.join(args.workdir, f"pairs_{args.lengths}_{num_pairs}.jsonl")
        if not os.path.exists(data):
            start = time.perf_counter()
            write_pairs(data, num_pairs, args.lengths, seed=num_pairs)
            print(json.dumps({"phase": "write", "num_pairs": num_pairs, "seconds": round(time.perf_counter() - start, 1),
                              "MiB": round(os.path.getsize(data) / 2**20)}), flush=True)
        cache_dir = os.path.join(args.workdir, f"cache_{num_pairs}_{time.time_ns()}")
        for phase in ("build", "warm", "iterate"):
            print(json.dumps(run_in_fresh_process(phase, num_pairs, data, cache_dir, args)), flush=True)
        arrow_bytes = sum(os.path.getsize(os.path.join(directory, name))
                          for directory, _, names in os.walk(cache_dir) for name in names)
        print(json.dumps({"phase": "cache size", "num_pairs": num_pairs, "MiB": round(arrow_bytes / 2**20)}), flush=True)


if __name__ == "__main__":
    main()
