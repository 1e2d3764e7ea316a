"""SIGKILL the training process at random moments, ten times in a row,
restarting it each time: every restart resumes from the newest complete
checkpoint, no step directory is ever half-written, and the finished run's
metrics equal those of an uninterrupted run.

A kill strikes at a random delay after one of three moments, so that it lands
in start-up, in a training step or in a checkpoint write whatever the load on
the machine: the process start, its first new complete checkpoint (so every
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

import pytest

from tests.conftest import REPO, RUN_DPO, TINY_OVERRIDES, read_jsonl
from tests.e2e.conftest import assert_same_records

NUM_STEPS = 24
# One process (a world of one), a checkpoint after every step.
OVERRIDES = [*TINY_OVERRIDES, f"dpo.max_num_steps={NUM_STEPS}", "policy.train_global_batch_size=8",
             "policy.train_micro_batch_size=4", "checkpointing.save_period=1", "data.val_data_path=null"]
CHECKPOINT_FILES = ("train_state.json", "model_arch.json", "config.yaml", "rng_rank0.pt", "tokenizer",
                    os.path.join("policy", "metadata.json"), os.path.join("policy", "common.pt"))
# What each of the ten kills waits for before its random delay.
KILL_AFTER = ("saved", "write", "start", "saved", "write", "saved", "start", "write", "saved", "start")


def _start(run_dir: str, log_path: str) -> subprocess.Popen:
    command = [sys.executable, RUN_DPO, "--config", os.path.join(REPO, "configs", "dpo.yaml"), *OVERRIDES,
               f"checkpointing.checkpoint_dir={run_dir}"]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    with open(log_path, "w") as log:
        # Its own session: the kill takes the checkpoint writer's helpers too.
        return subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)


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
    assert process.returncode == 0, open(log_path).read()
    return first_step, (time.monotonic() - start - first_step) / (NUM_STEPS - 1)


def _happened(event: str, run_dir: str, log_path: str, next_step: int) -> bool:
    if event == "start":
        return True
    # The banner follows the tidying of the run dir (a killed run's .tmp_* and
    # metrics records past its checkpoint are gone by then).
    if "megatron_dpo: " not in open(log_path).read():
        return False
    if event == "write":
        return any(name.startswith(".tmp_step_") for name in os.listdir(run_dir))
    return os.path.isdir(os.path.join(run_dir, f"step_{next_step}"))


def _kill(process: subprocess.Popen, run_dir: str, log_path: str, event: str, delay: float, next_step: int) -> None:
    """SIGKILL ``delay`` s after ``event``; fails if the run finishes first."""
    while not _happened(event, run_dir, log_path, next_step):
        assert process.poll() is None, f"the run finished before the kill after {event}"
        time.sleep(0.002)
    time.sleep(delay)
    assert process.poll() is None, f"the run finished before the kill after {event}"
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def _complete_steps(run_dir: str) -> list:
    """Step dirs visible after a kill; each must hold every checkpoint file."""
    if not os.path.isdir(run_dir):
        return []
    steps = sorted(int(name[5:]) for name in os.listdir(run_dir) if re.fullmatch(r"step_\d+", name))
    for step in steps:
        missing = [f for f in CHECKPOINT_FILES if not os.path.exists(os.path.join(run_dir, f"step_{step}", f))]
        assert not missing, f"step_{step} is visible but lacks {missing}"
    return steps


def _assert_resumed_from_newest(log_path: str, run_dir: str, steps: list, must_have_resumed: bool) -> None:
    """A restart that got as far as choosing a checkpoint chose the newest complete one."""
    with open(log_path) as log:
        resumed = [line for line in log if line.startswith("resumed from")]
    if steps and (resumed or must_have_resumed):
        assert resumed and resumed[0].startswith(f"resumed from {run_dir}/step_{steps[-1]} (step {steps[-1]},"), resumed
    elif not steps:
        assert not resumed, resumed


@pytest.mark.slow
def test_sigkill_at_random_moments_then_restart(tmp_path):
    reference_dir, run_dir = os.path.join(tmp_path, "reference"), os.path.join(tmp_path, "run")
    first_step, step_seconds = _timed_reference(reference_dir, os.path.join(tmp_path, "reference.log"))
    delays = {"start": (0.2 * first_step, 0.9 * first_step), "saved": (0.0, 2 * step_seconds), "write": (0.0, 0.02)}
    rng = random.Random(5)
    steps, kills_mid_write = [], 0
    for attempt, event in enumerate(KILL_AFTER):
        log_path = os.path.join(tmp_path, f"attempt_{attempt}.log")
        process = _start(run_dir, log_path)
        _kill(process, run_dir, log_path, event, rng.uniform(*delays[event]), (steps or [0])[-1] + 1)
        kills_mid_write += any(name.startswith(".tmp_step_") for name in os.listdir(run_dir))
        previous_steps, steps = steps, _complete_steps(run_dir)
        _assert_resumed_from_newest(log_path, run_dir, previous_steps, must_have_resumed=steps != previous_steps)
    print(f"first step after {first_step:.1f} s, then {step_seconds:.2f} s a step; "
          f"{kills_mid_write} kills left a half-written checkpoint; complete steps at the end: {steps}")
    assert kills_mid_write >= 1, "no kill landed during a checkpoint write"
    assert 0 < steps[-1] < NUM_STEPS

    final_log = os.path.join(tmp_path, "final.log")
    assert _start(run_dir, final_log).wait(timeout=600) == 0, open(final_log).read()
    _assert_resumed_from_newest(final_log, run_dir, steps, must_have_resumed=True)
    expected = read_jsonl(os.path.join(reference_dir, "metrics.jsonl"))
    assert_same_records(expected, read_jsonl(os.path.join(run_dir, "metrics.jsonl")))
