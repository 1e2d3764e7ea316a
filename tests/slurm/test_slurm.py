"""slurm/dpo.sbatch on a real two-node Slurm (tests/slurm/conftest.py): layouts
across nodes, USR1 -> save -> requeue -> resume, a node's processes killed,
and a time limit shorter than the run."""

import glob
import os
import re
import subprocess
import time

import pytest

from tests.conftest import read_jsonl, run_dpo
from tests.e2e.conftest import assert_same_records
from tests.slurm.conftest import DEMO_DATA, HELPER, job_field, read_log, submit, wait

pytestmark = pytest.mark.slow

NUM_STEPS = 20
STEPS = [f"dpo.max_num_steps={NUM_STEPS}"]
# Each test node has one "GPU", so one rank; --time overrides the sbatch file's 4 h.
TWO_NODES = ["--nodes=2", "--gpus-per-node=1", "--time=15"]
DATA = [f"data.train_data_path={DEMO_DATA}/train.jsonl", f"data.val_data_path={DEMO_DATA}/val.jsonl"]


def _records(job_dir: str):
    return read_jsonl(os.path.join(job_dir, "run", "metrics.jsonl"))


def _wait_for(condition, what: str, process: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, f"the job ended before {what}"
        assert time.monotonic() < deadline, f"no {what} within {timeout} s"
        time.sleep(0.02)


def _steps_done(job_dir: str) -> int:
    metrics = os.path.join(job_dir, "run", "metrics.jsonl")
    return len(read_jsonl(metrics)) if os.path.exists(metrics) else 0


@pytest.fixture(scope="module")
def two_node_job(slurm_env, tmp_path_factory):
    """(records, log) of an uninterrupted DP2 job, one rank on each of two nodes."""
    job_dir = str(tmp_path_factory.mktemp("two_node_job"))
    log = wait(submit(slurm_env, job_dir, TWO_NODES, STEPS), job_dir)
    return _records(job_dir), log


def test_dp2_across_two_nodes_equals_one_node(two_node_job, tmp_path):
    records, log = two_node_job
    assert "2 node(s) x 1 rank(s)" in log  # ranks per node from the node's GPUs
    assert "TP 1 x PP 1 x DP 2" in log
    assert [r["step"] for r in records] == list(range(1, NUM_STEPS + 1))
    assert records[0]["loss"] == pytest.approx(0.6931471805599453, rel=1e-6)  # ln 2: policy == reference
    one_node, _ = run_dpo(tmp_path, 2, [*DATA, *STEPS])  # torchrun, two ranks on this machine
    assert_same_records(one_node, records)


def test_tp2_across_two_nodes_equals_one_node(slurm_env, tmp_path):
    overrides = ["dpo.max_num_steps=4", "policy.megatron_cfg.tensor_model_parallel_size=2"]
    job_dir = os.path.join(str(tmp_path), "slurm")
    os.makedirs(job_dir)
    log = wait(submit(slurm_env, job_dir, TWO_NODES, overrides), job_dir)
    assert "TP 2 x PP 1 x DP 1" in log
    one_node, _ = run_dpo(os.path.join(str(tmp_path), "torchrun"), 2, [*DATA, *overrides])
    assert [r["step"] for r in one_node] == [1, 2, 3, 4]
    assert_same_records(one_node, _records(job_dir))


def test_usr1_saves_on_every_rank_requeues_and_resumes(slurm_env, two_node_job, tmp_path):
    job_dir = str(tmp_path)
    run_dir = os.path.join(job_dir, "run")
    process = submit(slurm_env, job_dir, TWO_NODES, STEPS)
    _wait_for(lambda: _steps_done(job_dir) >= 2, "2 training steps", process)
    subprocess.run(["scancel", "--signal=USR1", process.job_id], env=slurm_env, check=True, timeout=30)
    log = wait(process, job_dir)

    stopped_at = int(re.search(r"stopping after step (\d+) of \d+: signal", log).group(1))
    assert stopped_at < NUM_STEPS, "the job ended before the signal arrived"
    saved = os.path.join(run_dir, f"step_{stopped_at}")
    assert all(os.path.isfile(os.path.join(saved, f"rng_rank{rank}.pt")) for rank in (0, 1))  # both nodes saved
    assert "requeueing it to resume" in log
    assert f"resumed from {saved}" in log
    assert job_field(slurm_env, process.job_id, "Restarts") == "1"
    assert job_field(slurm_env, process.job_id, "JobState") == "COMPLETED"
    expected, _ = two_node_job
    assert_same_records(expected, _records(job_dir))


def _complete_steps(run_dir: str):
    return sorted(int(path.split("_")[-1]) for path in
                  (os.path.dirname(p) for p in glob.glob(os.path.join(run_dir, "step_*", "train_state.json"))))


def test_killed_node_leaves_no_half_step_and_the_next_job_resumes(slurm_env, slurm_cluster, two_node_job, tmp_path):
    job_dir = str(tmp_path)
    run_dir = os.path.join(job_dir, "run")
    overrides = [*STEPS, "checkpointing.save_period=5"]
    process = submit(slurm_env, job_dir, TWO_NODES, overrides)
    # Kill node 2 in the middle of the second save (step 10), so that a complete and a half-written step exist.
    _wait_for(lambda: _complete_steps(run_dir) and glob.glob(os.path.join(run_dir, ".tmp_step_*")),
              "a save after a complete one", process)
    subprocess.run(["bash", HELPER, "crash", slurm_cluster[1], "n2"], check=True, timeout=30)
    wait(process, job_dir, succeed=False)
    assert process.returncode != 0
    assert job_field(slurm_env, process.job_id, "JobState") == "FAILED"
    last_complete = _complete_steps(run_dir)[-1]
    half_written = [os.path.basename(p) for p in glob.glob(os.path.join(run_dir, ".tmp_step_*"))]
    assert half_written == [f".tmp_step_{last_complete + 5}"], (half_written, last_complete)

    log = wait(submit(slurm_env, job_dir, TWO_NODES, overrides), job_dir)
    assert f"resumed from {run_dir}/step_{last_complete} " in log
    assert not glob.glob(os.path.join(run_dir, ".tmp_*"))
    expected, _ = two_node_job
    assert_same_records(expected, _records(job_dir))


def test_time_limit_saves_before_it_and_the_requeued_job_resumes(slurm_env, tmp_path):
    job_dir = str(tmp_path)
    run_dir = os.path.join(job_dir, "run")
    # One minute, of which TIME_LIMIT_MARGIN keeps 35 s free: far too short for 2000 steps.
    env = dict(slurm_env, TIME_LIMIT_MARGIN="35")
    process = submit(env, job_dir, ["--nodes=2", "--gpus-per-node=1", "--time=1"], ["dpo.max_num_steps=2000", "dpo.max_num_epochs=100"])
    _wait_for(lambda: os.path.exists(os.path.join(job_dir, f"dpo-{process.job_id}.out")), "job start", process)
    started = time.time()
    _wait_for(lambda: "resumed from" in read_log(job_dir, process.job_id), "a resumed second attempt", process,
              timeout=200)
    subprocess.run(["scancel", process.job_id], env=slurm_env, check=True, timeout=30)
    log = wait(process, job_dir, succeed=False)

    stopped_at = int(re.search(r"stopping after step (\d+) of 2000: checkpointing.checkpoint_must_save_by", log)
                     .group(1))
    saved = os.path.join(run_dir, f"step_{stopped_at}")
    assert os.path.getmtime(os.path.join(saved, "train_state.json")) < started + 60, "saved after the time limit"
    assert "requeueing it to resume" in log
    assert f"resumed from {saved} " in log
    assert f"job {process.job_id} (restart 1)" in log
