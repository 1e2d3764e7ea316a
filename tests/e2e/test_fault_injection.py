"""Twenty-one faults in a row against a 2-rank torchrun run that saves every
step, restarting it after each: SIGKILL of the torchrun agent or of one rank
at random moments (start-up, a step, mid-save), and corruption of the newest
checkpoint (truncated, deleted or flipped files of every kind). Every restart
continues from the newest intact checkpoint (a damaged one is moved aside as
step_N.corrupt), no process outlives a kill by more than 30 s, no step
directory is ever half-written, and the finished run's metrics equal those of
an uninterrupted run.

A kill strikes at a random delay after one of three moments, so that it lands
in start-up, in a training step or in a checkpoint write whatever the load on
the machine: the start of both ranks, its first new complete checkpoint (so every
such restart makes progress), or the start of a checkpoint write (a
``.tmp_step_N`` directory appears).
"""

import os
import random
import re
import signal
import subprocess
import sys
import time

import psutil
import pytest

from tests.conftest import CPU_ENV, REPO, RUN_DPO, TINY_OVERRIDES, free_port, read_jsonl
from tests.e2e.conftest import assert_same_records

# Each of the 14 kills lets a restart make a step or more of progress (one
# after "saved" may let two more finish), less one per corruption: 48 steps
# leave the final restart work to do on a fast machine (CI reached 24 of 24).
NUM_STEPS = 48
# Two ranks (DP2), a checkpoint after every step.
OVERRIDES = [*TINY_OVERRIDES, f"dpo.max_num_steps={NUM_STEPS}", "policy.train_global_batch_size=8",
             "policy.train_micro_batch_size=2", "checkpointing.save_period=1", "data.val_data_path=null"]
CHECKPOINT_FILES = ("train_state.json", "model_arch.json", "config.yaml", "rng_rank0.pt", "rng_rank1.pt",
                    "tokenizer", "manifest.json", os.path.join("policy", "metadata.json"),
                    os.path.join("policy", "common.pt"), os.path.join("policy", ".metadata"))
# (what, when or which file, how): kills wait for "start", "saved" or "write".
EVENTS = [
    ("kill_agent", "saved"), ("kill_rank", "write"), ("corrupt", "policy/__0_0.distcp", "flip"),
    ("kill_rank", "saved"), ("kill_agent", "start"), ("corrupt", "policy/.metadata", "truncate"),
    ("kill_agent", "write"), ("kill_rank", "saved"), ("corrupt", "rng_rank1.pt", "delete"),
    ("kill_agent", "saved"), ("kill_rank", "start"), ("corrupt", "train_state.json", "flip"),
    ("kill_rank", "write"), ("kill_agent", "saved"), ("corrupt", "policy/common.pt", "truncate"),
    ("kill_agent", "write"), ("kill_rank", "saved"), ("corrupt", "policy/__0_1.distcp", "delete"),
    ("kill_rank", "write"), ("kill_agent", "saved"), ("corrupt", "manifest.json", "flip"),
]
GRACE_S = 30


def _start(run_dir: str, log_path: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
               RUN_DPO, "--config", os.path.join(REPO, "configs", "dpo.yaml"), *OVERRIDES,
               f"checkpointing.checkpoint_dir={run_dir}"]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", **CPU_ENV)
    with open(log_path, "w") as log:
        return subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)


def _timed_reference(run_dir: str, log_path: str):
    """Runs the uninterrupted reference; returns (seconds from start to its
    first step, seconds per later step with its checkpoint)."""
    start = time.monotonic()
    process = _start(run_dir, log_path)
    first_step = None
    while process.poll() is None:
        if first_step is None and os.path.exists(os.path.join(run_dir, "metrics.jsonl")):
            first_step = time.monotonic() - start
        time.sleep(0.01)
    assert process.returncode == 0, open(log_path).read()[-4000:]
    return first_step, (time.monotonic() - start - first_step) / (NUM_STEPS - 1)


def _happened(event: str, agent: subprocess.Popen, run_dir: str, log_path: str, next_step: int) -> bool:
    if event == "start":  # both ranks spawned (a loaded machine may take seconds)
        return len(_ranks(agent, _tree(agent))) == 2
    # The banner follows the tidying of the run dir (a killed run's .tmp_* and
    # metrics records past its checkpoint are gone by then).
    if "megatron_dpo: " not in open(log_path).read():
        return False
    if event == "write":
        return any(name.startswith(".tmp_step_") for name in os.listdir(run_dir))
    return os.path.isdir(os.path.join(run_dir, f"step_{next_step}"))


def _tree(agent: subprocess.Popen):
    try:
        return [psutil.Process(agent.pid), *psutil.Process(agent.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _ranks(agent: subprocess.Popen, processes: list) -> list:
    try:
        return [p for p in processes[1:] if p.ppid() == agent.pid]
    except psutil.NoSuchProcess:
        return []


def _kill(agent: subprocess.Popen, run_dir: str, log_path: str, what: str, event: str, delay: float,
          next_step: int, rng: random.Random) -> None:
    """SIGKILL the agent or one rank ``delay`` s after ``event``; then every
    process of the run must be gone within GRACE_S."""
    while not _happened(event, agent, run_dir, log_path, next_step):
        assert agent.poll() is None, f"the run finished before the kill after {event}"
        time.sleep(0.02 if event == "start" else 0.002)
    time.sleep(delay)
    processes = _tree(agent)
    ranks = _ranks(agent, processes)
    assert agent.poll() is None and len(ranks) == 2, f"the run finished before the kill after {event}"
    victim = agent.pid if what == "kill_agent" else rng.choice(ranks).pid
    os.kill(victim, signal.SIGKILL)
    deadline = time.time() + GRACE_S
    while time.time() < deadline:
        agent.poll()
        alive = [p for p in processes if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        if not alive:
            return
        time.sleep(0.2)
    for p in alive:
        p.kill()
    pytest.fail(f"{what}: alive {GRACE_S} s later: {[p.cmdline()[:3] for p in alive]}")


def _corrupt(run_dir: str, step: int, file: str, how: str) -> None:
    path = os.path.join(run_dir, f"step_{step}", file)
    if how == "delete":
        os.remove(path)
    elif how == "truncate":
        with open(path, "r+b") as handle:
            handle.truncate(os.path.getsize(path) // 2)
    else:
        with open(path, "r+b") as handle:
            handle.seek(os.path.getsize(path) // 2)
            data = handle.read(64)
            handle.seek(os.path.getsize(path) // 2)
            handle.write(bytes(b ^ 0xFF for b in data))


def _complete_steps(run_dir: str) -> list:
    """Step dirs visible after a kill; each must hold every checkpoint file."""
    if not os.path.isdir(run_dir):
        return []
    steps = sorted(int(name[5:]) for name in os.listdir(run_dir) if re.fullmatch(r"step_\d+", name))
    for step in steps:
        missing = [f for f in CHECKPOINT_FILES if not os.path.exists(os.path.join(run_dir, f"step_{step}", f))]
        assert not missing, f"step_{step} is visible but lacks {missing}"
    return steps


def _resumed_from(log_path: str):
    with open(log_path) as log:
        return [line for line in log if "resumed from" in line]


def _assert_resumed_from(log_path: str, run_dir: str, step, must_have_resumed: bool) -> None:
    """A restart that got as far as choosing a checkpoint chose ``step`` (None: none)."""
    resumed = _resumed_from(log_path)
    if step is None:
        assert not resumed, resumed
    elif resumed or must_have_resumed:
        assert resumed and f"resumed from {run_dir}/step_{step} (step {step}," in resumed[0], (step, resumed)


@pytest.mark.slow
def test_kills_and_corruptions_at_random_moments_then_restart(tmp_path):
    reference_dir, run_dir = os.path.join(tmp_path, "reference"), os.path.join(tmp_path, "run")
    first_step, step_seconds = _timed_reference(reference_dir, os.path.join(tmp_path, "reference.log"))
    delays = {"start": (0.2 * first_step, 0.9 * first_step), "saved": (0.0, 2 * step_seconds),
              "write": (0.0, 0.02)}
    rng = random.Random(5)
    steps, kills_mid_write, corrupted = [], 0, None
    for attempt, (what, *details) in enumerate(EVENTS):
        if what == "corrupt":
            if steps:  # the newest checkpoint; the next start moves it aside
                corrupted = steps[-1]
                _corrupt(run_dir, corrupted, *details)
            continue
        log_path = os.path.join(tmp_path, f"attempt_{attempt}.log")
        agent = _start(run_dir, log_path)
        event = details[0]
        _kill(agent, run_dir, log_path, what, event, rng.uniform(*delays[event]), (steps or [0])[-1] + 1, rng)
        kills_mid_write += any(name.startswith(".tmp_step_") for name in os.listdir(run_dir))
        intact_before = [s for s in steps if s != corrupted]
        previous, steps = steps, _complete_steps(run_dir)
        if corrupted is not None and _resumed_from(log_path):
            assert os.path.isdir(os.path.join(run_dir, f"step_{corrupted}.corrupt")), f"step_{corrupted} kept"
            corrupted = None
        expected = intact_before[-1] if intact_before else None
        _assert_resumed_from(log_path, run_dir, expected, must_have_resumed=steps != previous and bool(previous))
    print(f"first step after {first_step:.1f} s, then {step_seconds:.2f} s a step; {kills_mid_write} kills "
          f"left a half-written checkpoint; complete steps at the end: {steps}")
    assert kills_mid_write >= 1, "no kill landed during a checkpoint write"
    assert 0 < steps[-1] < NUM_STEPS

    final_log = os.path.join(tmp_path, "final.log")
    agent = _start(run_dir, final_log)
    assert agent.wait(timeout=600) == 0, open(final_log).read()[-4000:]
    expected = read_jsonl(os.path.join(reference_dir, "metrics.jsonl"))
    assert_same_records(expected, read_jsonl(os.path.join(run_dir, "metrics.jsonl")))
