"""No process outlives the one that started it (train/lifetime.py): a
SIGKILLed torchrun agent leaves no rank running, and a SIGKILLed rank leaves
none of the helpers it started (dist_checkpointing's writer processes)."""

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from tests.conftest import CPU_ENV, REPO, RUN_DPO, TINY_OVERRIDES, free_port

GRACE_S = 30


def _start(tmp_path):
    """A 2-rank run that saves every step; returns (agent, rank processes by rank) once step_1 is saved."""
    run_dir = str(tmp_path / "run")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
               RUN_DPO, "--config", os.path.join(REPO, "configs", "dpo.yaml"), *TINY_OVERRIDES,
               "dpo.max_num_steps=500", "dpo.max_num_epochs=100", "checkpointing.save_period=1",
               f"checkpointing.checkpoint_dir={run_dir}"]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", **CPU_ENV)
    log = open(tmp_path / "log", "w")
    agent = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 240
    while not os.path.isdir(os.path.join(run_dir, "step_2")):
        assert agent.poll() is None and time.time() < deadline, open(tmp_path / "log").read()[-3000:]
        time.sleep(0.2)
    ranks = {int(p.environ()["RANK"]): p for p in psutil.Process(agent.pid).children()}
    assert sorted(ranks) == [0, 1]
    return agent, ranks


def _alive(processes):
    return [p for p in processes if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


def _wait_gone(processes, agent):
    deadline = time.time() + GRACE_S
    while _alive(processes) and time.time() < deadline:
        agent.poll()  # reap the agent
        time.sleep(0.5)
    return _alive(processes)


@pytest.fixture
def cleanup():
    started = []
    yield started
    for process in started:
        for p in [process, *process.children(recursive=True)] if process.is_running() else []:
            p.kill()


def test_ranks_end_when_their_agent_is_killed(tmp_path, cleanup):
    agent, ranks = _start(tmp_path)
    everyone = [p for rank in ranks.values() for p in [rank, *rank.children(recursive=True)]]
    cleanup.extend(ranks.values())
    os.kill(agent.pid, signal.SIGKILL)
    left = _wait_gone(everyone, agent)
    assert not left, f"alive {GRACE_S} s after the agent's SIGKILL: {[p.cmdline()[:4] for p in left]}"


def test_helpers_of_a_killed_rank_end_with_it(tmp_path, cleanup):
    agent, ranks = _start(tmp_path)
    helpers = ranks[0].children(recursive=True)  # after a save: dist_checkpointing's manager (and its tracker)
    assert helpers, "rank 0 started no helper process during its saves"
    cleanup.extend(ranks.values())
    # Agent and rank together: no one is left to clean up after the rank.
    os.kill(agent.pid, signal.SIGKILL)
    os.kill(ranks[0].pid, signal.SIGKILL)
    left = _wait_gone(helpers + [ranks[1]], agent)
    assert not left, f"alive {GRACE_S} s after SIGKILL of rank 0: {[p.cmdline()[:4] for p in left]}"


def test_ranks_end_when_their_agent_is_killed_during_their_imports(tmp_path, cleanup):
    """The agent dies half a second after spawning its ranks, while they still
    import torch and megatron: they must still notice (the watch starts first)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
               RUN_DPO, "--config", os.path.join(REPO, "configs", "dpo.yaml"), *TINY_OVERRIDES,
               f"checkpointing.checkpoint_dir={tmp_path / 'run'}"]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", **CPU_ENV)
    with open(tmp_path / "log", "w") as log:
        agent = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 120
    while len(ranks := psutil.Process(agent.pid).children()) < 2:
        assert agent.poll() is None and time.time() < deadline, open(tmp_path / "log").read()[-3000:]
        time.sleep(0.01)
    cleanup.extend(ranks)
    time.sleep(0.5)
    os.kill(agent.pid, signal.SIGKILL)
    left = _wait_gone(ranks, agent)
    assert not left, f"alive {GRACE_S} s after the agent's SIGKILL: {[p.cmdline()[:4] for p in left]}"
