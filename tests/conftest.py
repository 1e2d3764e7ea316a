"""Shared test helpers: launching multi-rank runs through torchrun on gloo."""

import json
import os
import socket
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN_DPO = os.path.join(REPO, "scripts", "run_dpo.py")


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    """``cpu_only`` tests check what compat.py does without CUDA: on a GPU host
    they are skipped, with the reason, instead of failing."""
    if not any(item.get_closest_marker("cpu_only") for item in items) or not _cuda_available():
        return
    skip = pytest.mark.skip(reason="cpu_only: the CPU redirects of parallel/compat.py are inactive where CUDA is present")
    for item in items:
        if item.get_closest_marker("cpu_only"):
            item.add_marker(skip)


# The multi-rank tests run on CPU / gloo (tiny models, 2-8 ranks) on every
# host: a GPU host's devices are hidden from them, so 8 ranks do not share one GPU.
CPU_ENV = {"CUDA_VISIBLE_DEVICES": ""}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun(nproc: int, script: str, args, timeout: int = 300, env=None, check: bool = True):
    """Run ``script`` on ``nproc`` local ranks; returns the CompletedProcess."""
    command = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
        f"--master_port={free_port()}", script, *args,
    ]
    # The repo root on the path: test scripts import shared helpers from tests/.
    python_path = os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p)
    run_env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=python_path, **CPU_ENV,
                   **(env or {}))
    result = subprocess.run(command, cwd=REPO, env=run_env, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(
            f"torchrun {script} failed with exit code {result.returncode}\n--- stdout ---\n"
            f"{result.stdout[-6000:]}\n--- stderr ---\n{result.stderr[-6000:]}"
        )
    return result


def read_jsonl(path: str):
    with open(path) as handle:
        return [json.loads(line) for line in handle if line.strip()]


# Tiny, fast, fp32 settings every distributed/e2e test starts from.
TINY_OVERRIDES = [
    "policy.model_name=tiny-llama",
    "policy.precision=float32",
    "policy.max_total_sequence_length=64",
    "dpo.val_at_start=false",
    "dpo.val_at_end=false",
    "dpo.val_period=0",
    "logger.tensorboard_enabled=false",
    "logger.plot_enabled=false",
]


def run_dpo(tmp_path, nproc: int, overrides, timeout: int = 300, check: bool = True, env=None):
    """Train with scripts/run_dpo.py into tmp_path; returns (records, CompletedProcess)."""
    run_dir = os.path.join(str(tmp_path), "run")
    args = ["--config", os.path.join(REPO, "configs", "dpo.yaml"), *TINY_OVERRIDES,
            f"checkpointing.checkpoint_dir={run_dir}", *overrides]
    result = torchrun(nproc, RUN_DPO, args, timeout=timeout, check=check, env=env)
    metrics = os.path.join(run_dir, "metrics.jsonl")
    records = read_jsonl(metrics) if os.path.exists(metrics) else []
    return records, result


@pytest.fixture
def repo_dir():
    return REPO
