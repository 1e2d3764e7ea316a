"""scripts/benchmark.py on a tiny synthetic model, pipeline-parallel on 2 ranks:
every variant runs and reports, and the p2p traffic is timed."""

import json
import os

from tests.conftest import REPO, torchrun

SCRIPT = os.path.join(REPO, "scripts", "benchmark.py")


def test_benchmark_reports_every_variant():
    args = ["--hidden", "64", "--layers", "2", "--max-length", "64", "--global-batch", "4", "--micro-batch", "2",
            "--warmup", "0", "--steps", "1", "--peak-size", "256",
            "policy.megatron_cfg.pipeline_model_parallel_size=2"]
    output = torchrun(2, SCRIPT, args, timeout=300).stdout
    report = json.loads(output[output.index("{"):])
    assert report["layout"] == {"tp": 1, "pp": 2, "dp": 1}
    assert set(report["variants"]) == {"padded", "packed", "shared", "shared_cached"}
    for name, variant in report["variants"].items():
        assert variant["tokens_per_s"] > 0 and 0 < variant["mfu"] < 1, name
        assert variant["phases_s_median"]["comm"] > 0, name  # activations sent between stages
    assert report["variants"]["shared_cached"]["phases_s_median"]["reference"] == 0.0
    assert set(report["speedup_tokens_per_s"]) == {
        "packed/padded", "shared/padded", "shared_cached/shared", "shared_cached/padded"}
