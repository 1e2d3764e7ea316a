"""scripts/gpu_check.sh --dry-run: the GPU machine check on CPU at tiny size.
CI runs it through this test: every check that can run on a CPU passes, the
GPU-only ones are reported not_run with the reason, the exit code is 0."""

import json
import os
import subprocess
import sys

from tests.conftest import REPO

CPU_CHECKS = {"versions", "kernel_plan", "logprob_agreement", "step1_loss_ln2", "throughput", "memory_estimate",
              "cpu_checkpoint_loads_and_trains"}
GPU_ONLY = {"te_spec_bf16", "fusions_on", "host_syncs", "mfu", "peak_memory"}


def test_dry_run_passes_the_cpu_checks_and_reports_the_gpu_ones_not_run(tmp_path):
    out = tmp_path / "summary.json"
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1")
    result = subprocess.run(["bash", os.path.join(REPO, "scripts", "gpu_check.sh"), "--dry-run", "--out", str(out)],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    summary = json.loads(out.read_text())
    assert result.stdout.rstrip().endswith(json.dumps(summary, indent=1))  # the JSON is printed last
    statuses = {check["name"]: check["status"] for check in summary["checks"]}
    assert summary["mode"] == "dry-run" and summary["failed"] == []
    assert statuses == {**dict.fromkeys(CPU_CHECKS, "pass"), **dict.fromkeys(GPU_ONLY, "not_run")}
    assert all(check["reason"] for check in summary["checks"] if check["status"] == "not_run")
    by_name = {check["name"]: check for check in summary["checks"]}
    assert set(by_name["throughput"]["variants"]) == {"padded", "packed", "shared", "shared_cached"}
    assert by_name["logprob_agreement"]["tolerance"] == 1e-5
