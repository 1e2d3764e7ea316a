"""slurm/job_state.py without Slurm: the time budget the ranks get, and the
requeue decision, as the batch script and torchrun_node.sh call them."""

import json
import os
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO

JOB_STATE = os.path.join(REPO, "slurm", "job_state.py")


def _job_state(*args, env=None):
    run_env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])))
    run_env.pop("JOB_END_TIME", None)
    run_env.update(env or {})
    return subprocess.run([sys.executable, JOB_STATE, *args], env=run_env, capture_output=True, text=True,
                          timeout=60)


def _write_summary(run_dir, **fields):
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "summary.json"), "w") as handle:
        json.dump(fields, handle)


def _seconds(hh_mm_ss: str) -> int:
    hours, minutes, seconds = map(int, hh_mm_ss.split(":"))
    return hours * 3600 + minutes * 60 + seconds


def _budget(result) -> int:
    assert result.returncode == 0, result.stderr
    last = result.stdout.splitlines()[-1]
    key, value = last.split("=")
    assert key == "checkpointing.checkpoint_must_save_by"
    return _seconds(value)


def test_without_a_time_limit_the_arguments_pass_unchanged(tmp_path):
    args = ["--config", "configs/dpo.yaml", f"checkpointing.checkpoint_dir={tmp_path}", "dpo.max_num_steps=3"]
    result = _job_state("run-args", *args)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == args


def test_budget_is_time_left_less_margin_and_last_save(tmp_path):
    run_dir = str(tmp_path / "run")
    end_time = str(time.time() + 3600)
    margin = {"JOB_END_TIME": end_time, "TIME_LIMIT_MARGIN": "600"}
    first = _budget(_job_state("run-args", f"checkpointing.checkpoint_dir={run_dir}", env=margin))
    assert 3000 - 5 <= first <= 3000
    _write_summary(run_dir, stopped_early="checkpointing.checkpoint_must_save_by", max_save_time_s=120.5)
    after_a_save = _budget(_job_state("run-args", f"checkpointing.checkpoint_dir={run_dir}", env=margin))
    assert 2879 - 5 <= after_a_save <= 2879


def test_a_smaller_budget_in_the_arguments_wins(tmp_path):
    args = [f"checkpointing.checkpoint_dir={tmp_path}", "checkpointing.checkpoint_must_save_by=00:10:00"]
    result = _job_state("run-args", *args, env={"JOB_END_TIME": str(time.time() + 3600)})
    assert _budget(result) == 600
    assert result.stdout.splitlines()[:2] == args  # the budget comes last, so it is the one that counts


def test_no_time_left_gives_a_zero_budget_and_says_why(tmp_path):
    result = _job_state("run-args", f"checkpointing.checkpoint_dir={tmp_path}",
                        env={"JOB_END_TIME": str(time.time() + 60), "TIME_LIMIT_MARGIN": "300"})
    assert _budget(result) == 0
    assert "Raise --time or lower TIME_LIMIT_MARGIN" in result.stderr


@pytest.mark.parametrize("stopped_early, returncode", [
    ("signal (SIGUSR1)", 0), ("checkpointing.checkpoint_must_save_by", 0), (None, 1),
])
def test_stopped_early_reads_the_summary(tmp_path, stopped_early, returncode):
    _write_summary(str(tmp_path), stopped_early=stopped_early)
    assert _job_state("stopped-early", f"checkpointing.checkpoint_dir={tmp_path}").returncode == returncode


def test_stopped_early_without_a_summary_does_not_requeue(tmp_path):
    assert _job_state("stopped-early", f"checkpointing.checkpoint_dir={tmp_path}/none").returncode == 1


def test_a_config_error_exits_2_with_the_message(tmp_path):
    result = _job_state("run-args", "checkpointing.no_such_key=1", env={"JOB_END_TIME": str(time.time() + 3600)})
    assert result.returncode == 2
    assert "checkpointing.no_such_key" in result.stderr
