"""slurm/dpo.sbatch under a real Slurm: a one-node cluster on this machine
(tests/slurm/local_slurm.sh), two "GPUs" backed by null devices, so the job
runs two CPU ranks (DP 2) of the tiny model.

Needs root and the Debian packages slurm-wlm and munge; skipped without them,
except under CI (CI set), where it fails instead.
"""

import glob
import os
import re
import shutil
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO, TINY_OVERRIDES, free_port, read_jsonl
from tests.e2e.conftest import assert_same_records

pytestmark = pytest.mark.slow

HELPER = os.path.join(REPO, "tests", "slurm", "local_slurm.sh")
SBATCH = os.path.join(REPO, "slurm", "dpo.sbatch")
NUM_STEPS = 20
# The test cluster has one node with 2 GPUs; --time overrides the 4 h default.
ONE_NODE = ["--nodes=1", "--gpus-per-node=2", "--time=15"]


def _missing_requirement():
    if os.geteuid() != 0:
        return "slurmd must run as root"
    if shutil.which("sbatch") is None:
        return "Slurm is not installed: apt-get install slurm-wlm munge"
    return None


@pytest.fixture(scope="module")
def slurm_env(tmp_path_factory):
    """Environment of a running one-node Slurm; the daemons stop after the module."""
    missing = _missing_requirement()
    if missing:
        (pytest.fail if os.environ.get("CI") else pytest.skip)(missing)
    state_dir = str(tmp_path_factory.mktemp("slurm"))
    start = subprocess.run(["bash", HELPER, "start", state_dir], capture_output=True, text=True, timeout=180)
    assert start.returncode == 0, start.stdout + start.stderr
    try:
        yield dict(
            os.environ, SLURM_CONF=os.path.join(state_dir, "slurm.conf"), PYTHON=sys.executable, DPO_DIR=REPO,
            RDZV_PORT=str(free_port()), HF_HUB_OFFLINE="1",
        )
    finally:
        subprocess.run(["bash", HELPER, "stop", state_dir], check=True, timeout=180)


def _job_args(run_dir: str):
    data = os.path.join(REPO, "data", "demo")
    return [
        "--config", os.path.join(REPO, "configs", "dpo.yaml"), *TINY_OVERRIDES,
        f"data.train_data_path={data}/train.jsonl", f"data.val_data_path={data}/val.jsonl",
        f"checkpointing.checkpoint_dir={run_dir}", f"dpo.max_num_steps={NUM_STEPS}",
    ]


def _submit(env, job_dir: str) -> subprocess.Popen:
    """``sbatch --wait`` from job_dir (which gets the job's log); returns once the job id is known."""
    command = ["sbatch", "--wait", *ONE_NODE, SBATCH, *_job_args(os.path.join(job_dir, "run"))]
    submit = subprocess.Popen(command, cwd=job_dir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    submit.job_id = re.search(r"Submitted batch job (\d+)", submit.stdout.readline()).group(1)
    return submit


def _wait(submit: subprocess.Popen, job_dir: str) -> str:
    """Wait for ``sbatch --wait``; returns the job's log, asserting the job succeeded."""
    output, _ = submit.communicate(timeout=600)
    (log_path,) = glob.glob(os.path.join(job_dir, f"dpo-{submit.job_id}.out"))
    with open(log_path, errors="replace") as handle:  # a killed progress bar may end mid-character
        log = handle.read()
    assert submit.returncode == 0, f"{output}\n--- job log ---\n{log[-8000:]}"
    return log


def _job_field(env, job_id: str, field: str) -> str:
    info = subprocess.run(["scontrol", "show", "job", "-o", job_id], env=env, capture_output=True, text=True).stdout
    return re.search(rf"\b{field}=(\S+)", info).group(1)


@pytest.fixture(scope="module")
def uninterrupted_job(slurm_env, tmp_path_factory):
    """(records, log) of one job that ran NUM_STEPS steps without interruption."""
    job_dir = str(tmp_path_factory.mktemp("uninterrupted_job"))
    log = _wait(_submit(slurm_env, job_dir), job_dir)
    return read_jsonl(os.path.join(job_dir, "run", "metrics.jsonl")), log


def test_sbatch_trains_to_completion(uninterrupted_job):
    records, log = uninterrupted_job
    assert "1 node(s) x 2 rank(s)" in log  # ranks per node from the job's GPUs
    assert "TP 1 x PP 1 x DP 2" in log
    assert [r["step"] for r in records] == list(range(1, NUM_STEPS + 1))
    assert records[0]["loss"] == pytest.approx(0.6931471805599453, rel=1e-6)  # ln 2: policy == reference


def test_usr1_saves_requeues_and_resumes(slurm_env, uninterrupted_job, tmp_path):
    job_dir, run_dir = str(tmp_path), os.path.join(str(tmp_path), "run")
    metrics = os.path.join(run_dir, "metrics.jsonl")
    submit = _submit(slurm_env, job_dir)
    deadline = time.monotonic() + 300
    while not (os.path.exists(metrics) and len(read_jsonl(metrics)) >= 2):
        assert submit.poll() is None and time.monotonic() < deadline, "the job trained no 2 steps within 300 s"
        time.sleep(0.1)
    subprocess.run(["scancel", "--signal=USR1", submit.job_id], env=slurm_env, check=True)
    log = _wait(submit, job_dir)

    stopped_at = int(re.search(r"stopping after step (\d+)", log).group(1))
    assert stopped_at < NUM_STEPS, "the job ended before the signal arrived"
    assert os.path.isdir(os.path.join(run_dir, f"step_{stopped_at}"))
    assert "requeueing it to resume" in log
    assert f"resumed from {run_dir}/step_{stopped_at}" in log
    assert _job_field(slurm_env, submit.job_id, "Restarts") == "1"
    assert _job_field(slurm_env, submit.job_id, "JobState") == "COMPLETED"
    expected, _ = uninterrupted_job
    assert_same_records(expected, read_jsonl(metrics))
