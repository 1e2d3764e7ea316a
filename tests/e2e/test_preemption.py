"""Asked to stop (SIGTERM / SIGUSR1, or the checkpoint_must_save_by budget),
every rank finishes its step, saves it and exits 0; the run then continues
from that checkpoint as if never stopped."""

import json
import os
import signal
import subprocess
import sys
import time

import psutil

from tests.conftest import REPO, RUN_DPO, TINY_OVERRIDES, free_port, read_jsonl, run_dpo
from tests.e2e.conftest import RESUMABLE, assert_same_records


def _start_torchrun(run_dir: str, overrides) -> subprocess.Popen:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
               RUN_DPO, "--config", os.path.join(REPO, "configs", "dpo.yaml"), *TINY_OVERRIDES,
               f"checkpointing.checkpoint_dir={run_dir}", *overrides]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for_first_step(process: subprocess.Popen, metrics_path: str) -> None:
    deadline = time.monotonic() + 300
    while not (os.path.exists(metrics_path) and read_jsonl(metrics_path)):
        assert process.poll() is None, process.stdout.read()
        assert time.monotonic() < deadline, "no training step within 300 s"
        time.sleep(0.02)


def _rank_process(launcher: subprocess.Popen, rank: int) -> psutil.Process:
    (worker,) = [child for child in psutil.Process(launcher.pid).children()
                 if child.environ().get("RANK") == str(rank)]
    return worker


def test_sigterm_to_one_rank_saves_the_step_in_progress_and_exits_0(uninterrupted, tmp_path):
    expected, _ = uninterrupted
    run_dir = os.path.join(tmp_path, "run")
    launcher = _start_torchrun(run_dir, [*RESUMABLE, "checkpointing.save_period=0"])
    _wait_for_first_step(launcher, os.path.join(run_dir, "metrics.jsonl"))
    # Slurm's --signal may reach the ranks at different moments: signal rank 1 only.
    _rank_process(launcher, 1).send_signal(signal.SIGTERM)
    output, _ = launcher.communicate(timeout=300)
    assert launcher.returncode == 0, output
    stopped_at = read_jsonl(os.path.join(run_dir, "metrics.jsonl"))[-1]["step"]
    assert stopped_at < 8, "the run ended before the signal arrived"
    assert [name for name in os.listdir(run_dir) if name.startswith(("step_", ".tmp_"))] == [f"step_{stopped_at}"]
    with open(os.path.join(run_dir, "summary.json")) as handle:
        assert json.load(handle)["stopped_early"] == "signal"

    records, result = run_dpo(tmp_path, 2, RESUMABLE)
    assert f"resumed from {run_dir}/step_{stopped_at}" in result.stdout
    assert_same_records(expected, records)


def test_must_save_by_budget_saves_and_exits_0(tmp_path):
    # A 1-second budget from process start is spent before the first step ends.
    records, result = run_dpo(tmp_path, 1, ["dpo.max_num_steps=8", "policy.train_global_batch_size=8",
                                            "checkpointing.checkpoint_must_save_by=00:00:01"])
    assert [r["step"] for r in records] == [1]
    assert "stopping after step 1 of 8: checkpointing.checkpoint_must_save_by" in result.stdout
    assert os.path.isfile(os.path.join(tmp_path, "run", "step_1", "train_state.json"))
