"""A two-node Slurm cluster on this machine (tests/slurm/local_slurm.sh) and
helpers that run slurm/dpo.sbatch on it.

Each node is a network namespace with its own address and hostname and two
"GPUs" backed by null devices, so a job runs CPU ranks (gloo) of the tiny
model, one per "GPU". Needs root and the Debian packages slurm-wlm, munge and
iproute2; skipped without them, except under CI (CI set), where it fails.
"""

import glob
import os
import re
import shutil
import subprocess
import sys
from typing import List

import pytest

from tests.conftest import REPO, TINY_OVERRIDES, free_port

HELPER = os.path.join(REPO, "tests", "slurm", "local_slurm.sh")
SBATCH = os.path.join(REPO, "slurm", "dpo.sbatch")
DEMO_DATA = os.path.join(REPO, "data", "demo")
JOB_TIMEOUT = 300  # seconds any one job (all its attempts) may take here


def _missing_requirement():
    if os.geteuid() != 0:
        return "network namespaces and slurmd need root"
    for tool in ("sbatch", "ip"):
        if shutil.which(tool) is None:
            return f"{tool} not found: apt-get install slurm-wlm munge iproute2"
    return None


@pytest.fixture(scope="package")
def slurm_cluster(tmp_path_factory):
    """(environment for sbatch/squeue/scontrol, state dir) of a running two-node
    Slurm; the daemons and the network are removed after the package's tests."""
    missing = _missing_requirement()
    if missing:
        (pytest.fail if os.environ.get("CI") else pytest.skip)(missing)
    state_dir = str(tmp_path_factory.mktemp("slurm"))
    try:
        start = subprocess.run(["bash", HELPER, "start", state_dir, "2"], capture_output=True, text=True, timeout=120)
        assert start.returncode == 0, start.stdout + start.stderr
        # The jobs import this checkout's megatron_dpo, whatever the interpreter has installed.
        python_path = os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")]))
        yield dict(
            os.environ, SLURM_CONF=os.path.join(state_dir, "slurm.conf"), PYTHON=sys.executable, DPO_DIR=REPO,
            PYTHONPATH=python_path, RDZV_PORT=str(free_port()), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1",
        ), state_dir
    finally:
        subprocess.run(["bash", HELPER, "stop", state_dir], timeout=120)


@pytest.fixture(scope="package")
def slurm_env(slurm_cluster):
    return slurm_cluster[0]


def job_args(run_dir: str, overrides: List[str]) -> List[str]:
    """scripts/run_dpo.py arguments: the tiny fp32 model on the demo data, into run_dir."""
    return [
        "--config", os.path.join(REPO, "configs", "dpo.yaml"), *TINY_OVERRIDES,
        f"data.train_data_path={DEMO_DATA}/train.jsonl", f"data.val_data_path={DEMO_DATA}/val.jsonl",
        f"checkpointing.checkpoint_dir={run_dir}", *overrides,
    ]


def submit(env, job_dir: str, sbatch_options: List[str], overrides: List[str]) -> subprocess.Popen:
    """``sbatch --wait`` from job_dir (which gets the job's log, and the run in job_dir/run);
    returns once the job id is known."""
    command = ["sbatch", "--wait", *sbatch_options, SBATCH, *job_args(os.path.join(job_dir, "run"), overrides)]
    process = subprocess.Popen(command, cwd=job_dir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    first_line = process.stdout.readline()
    match = re.search(r"Submitted batch job (\d+)", first_line)
    assert match, first_line + process.communicate(timeout=30)[0]
    process.job_id = match.group(1)
    return process


def wait(process: subprocess.Popen, job_dir: str, succeed: bool = True) -> str:
    """Wait for ``sbatch --wait``; returns the job's log. With ``succeed``, asserts the job did."""
    try:
        output, _ = process.communicate(timeout=JOB_TIMEOUT)
    except subprocess.TimeoutExpired:
        process.kill()
        raise
    log = read_log(job_dir, process.job_id)
    if succeed:
        assert process.returncode == 0, f"{output}\n--- job log ---\n{log[-8000:]}"
    return log


def read_log(job_dir: str, job_id: str) -> str:
    (path,) = glob.glob(os.path.join(job_dir, f"dpo-{job_id}.out"))
    with open(path, errors="replace") as handle:  # a killed progress bar may end mid-character
        return handle.read()


def job_field(env, job_id: str, field: str) -> str:
    info = subprocess.run(["scontrol", "show", "job", "-o", job_id], env=env, capture_output=True, text=True,
                          timeout=30).stdout
    return re.search(rf"\b{field}=(\S+)", info).group(1)
