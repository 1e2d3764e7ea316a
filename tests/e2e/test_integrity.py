"""Nothing lost, nothing run (issue 12), through the CLI: a damaged newest
checkpoint is moved aside and the run continues from the previous one with
the metrics of a run never damaged; a full disk stops the run with a clear
message and the next run resumes; one writer per run directory; a user's
directory is never taken over; bad inputs stop before any work (exit 2)."""

import json
import os
import re
import shutil
import subprocess
import sys
import time

import pytest

from tests.conftest import CPU_ENV, REPO, RUN_DPO, TINY_OVERRIDES, free_port, run_dpo
from tests.e2e.conftest import RESUMABLE, assert_same_records

SAVED_EVERY_STEP = [*RESUMABLE, "checkpointing.save_period=1"]


def _rank_exit_code(result) -> int:
    """The ranks' exit code (torchrun itself exits 1 when a rank fails, and
    stops the other ranks with SIGTERM, -15, once the first one has exited)."""
    codes = {int(code) for code in re.findall(r"exitcode\s*:\s*(-?\d+)", result.stderr)} - {-15}
    assert len(codes) == 1, (codes, result.stderr[-3000:])
    return codes.pop()


def _damage(path: str, how: str) -> None:
    if how == "delete":
        os.remove(path)
    elif how == "truncate":
        with open(path, "r+b") as handle:
            handle.truncate(os.path.getsize(path) // 2)
    else:  # flip: 64 bytes in the middle, the size unchanged
        with open(path, "r+b") as handle:
            handle.seek(os.path.getsize(path) // 2)
            data = handle.read(64)
            handle.seek(os.path.getsize(path) // 2)
            handle.write(bytes(b ^ 0xFF for b in data))


def _run_dir_at(source_dir: str, run_dir: str, newest: int) -> None:
    """A copy of the uninterrupted run as it was right after saving step ``newest``."""
    shutil.copytree(source_dir, run_dir)
    for name in os.listdir(run_dir):
        if name.startswith("step_") and int(name[5:]) > newest:
            shutil.rmtree(os.path.join(run_dir, name))


@pytest.mark.parametrize("file, how", [
    ("policy/__0_1.distcp", "flip"),
    ("policy/.metadata", "truncate"),
    ("rng_rank1.pt", "delete"),
    ("train_state.json", "flip"),
])
def test_damaged_newest_checkpoint_is_moved_aside_and_the_run_continues(tmp_path, uninterrupted, file, how):
    expected, source_dir = uninterrupted
    run_dir = os.path.join(tmp_path, "run")
    _run_dir_at(source_dir, run_dir, newest=5)
    _damage(os.path.join(run_dir, "step_5", file), how)
    records, result = run_dpo(tmp_path, 2, SAVED_EVERY_STEP)
    assert os.path.isdir(os.path.join(run_dir, "step_5.corrupt")), result.stdout[-2000:]
    assert f"checkpoint {run_dir}/step_5 is damaged" in result.stderr
    assert os.path.basename(file) in result.stderr  # the warning names the file
    assert f"resumed from {run_dir}/step_4 (step 4," in result.stdout
    assert_same_records(expected, records)


def test_full_disk_stops_with_a_clear_message_and_the_next_run_resumes(tmp_path, uninterrupted):
    if os.geteuid() != 0:
        (pytest.fail if os.environ.get("CI") else pytest.skip)("mounting a small tmpfs needs root")
    expected, _ = uninterrupted
    run_dir = os.path.join(tmp_path, "run")
    os.makedirs(run_dir)
    # Room for the data cache and about one checkpoint of the tiny model (DP2, ~3.5 MB), not two.
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", run_dir], check=True)
    try:
        records, result = run_dpo(tmp_path, 2, SAVED_EVERY_STEP, check=False)
        assert _rank_exit_code(result) == 4, result.stderr[-3000:]
        assert "could not write checkpoint step_2" in result.stderr and "the disk is full" in result.stderr
        assert "the newest complete checkpoint is step_1" in result.stderr and "]: Traceback" not in result.stderr
        assert not [name for name in os.listdir(run_dir) if name.startswith(".tmp_")]  # no half-written step left
        subprocess.run(["mount", "-o", "remount,size=256m", run_dir], check=True)  # space is back
        records, result = run_dpo(tmp_path, 2, SAVED_EVERY_STEP)
        assert f"resumed from {run_dir}/step_1 (step 1," in result.stdout
        assert_same_records(expected, records)
    finally:
        subprocess.run(["umount", "-l", run_dir], check=False)


def test_second_run_on_one_directory_is_refused_naming_the_holder(tmp_path):
    run_dir = os.path.join(tmp_path, "run")
    command = [sys.executable, RUN_DPO, "--config", os.path.join(REPO, "configs", "dpo.yaml"), *TINY_OVERRIDES,
               "dpo.max_num_steps=500", "dpo.max_num_epochs=100", f"checkpointing.checkpoint_dir={run_dir}"]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", MASTER_PORT=str(free_port()), **CPU_ENV)
    first = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not os.path.exists(os.path.join(run_dir, "metrics.jsonl")):
            assert first.poll() is None and time.time() < deadline
            time.sleep(0.2)
        start = time.time()
        second = subprocess.run(command, cwd=REPO, env=dict(env, MASTER_PORT=str(free_port())),
                                capture_output=True, text=True, timeout=120)
        # Refused at startup, before any data or model work (imports take ~10 s, longer on a busy machine).
        assert second.returncode == 2 and time.time() - start < 60
        assert f"is in use by another run (host {os.uname().nodename}, pid {first.pid}" in second.stderr
        assert first.poll() is None  # the first run goes on
    finally:
        first.kill()
        first.wait()


def test_a_users_directory_is_never_taken_over(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "notes.txt").write_text("mine")
    _, result = run_dpo(tmp_path, 1, ["dpo.max_num_steps=1"], check=False)
    assert _rank_exit_code(result) == 2 and "has no .megatron_dpo_run marker" in result.stderr
    assert sorted(os.listdir(run_dir)) == ["notes.txt"] and (run_dir / "notes.txt").read_text() == "mine"


def test_export_over_a_users_directory_is_refused_before_training(tmp_path):
    target = tmp_path / "base_model"
    target.mkdir()
    (target / "config.json").write_text("{}")
    records, result = run_dpo(tmp_path, 1, ["dpo.max_num_steps=1", f"checkpointing.export_hf_dir={target}"],
                              check=False)
    assert _rank_exit_code(result) == 2 and "has no .megatron_dpo_export marker" in result.stderr
    assert not records and sorted(os.listdir(target)) == ["config.json"]


def test_precision_change_on_resume_is_refused_naming_the_key(tmp_path):
    run_dpo(tmp_path, 1, ["dpo.max_num_steps=1"])
    records, result = run_dpo(tmp_path, 1, ["dpo.max_num_steps=2", "policy.precision=bfloat16"], check=False)
    assert _rank_exit_code(result) == 2 and "]: Traceback" not in result.stderr and "KeyError" not in result.stderr
    assert "trained with policy.precision=float32, this run sets policy.precision=bfloat16" in result.stderr


def test_validation_set_smaller_than_its_batch_is_refused_at_startup(tmp_path):
    val = tmp_path / "val.jsonl"
    val.write_text("".join(json.dumps({"prompt": f"q{i}", "chosen": "yes", "rejected": "no"}) + "\n"
                           for i in range(3)))
    records, result = run_dpo(tmp_path, 1, [f"data.val_data_path={val}", "dpo.val_global_batch_size=8",
                                            "dpo.val_period=5"], check=False)
    assert _rank_exit_code(result) == 2 and not records
    assert f"{val} (val) holds 3 usable pairs, fewer than one validation batch" in result.stderr


def test_non_utf8_data_names_file_line_and_offset(tmp_path):
    train = tmp_path / "train.jsonl"
    good = json.dumps({"prompt": "q", "chosen": "yes", "rejected": "no"}).encode() + b"\n"
    train.write_bytes(good * 3 + b'{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}\n')
    records, result = run_dpo(tmp_path, 1, [f"data.train_data_path={train}"], check=False)
    assert _rank_exit_code(result) == 2 and not records and "]: Traceback" not in result.stderr
    assert f"{train}:4" in result.stderr and "byte" in result.stderr


class _CreatesAFile:
    """Unpickling this calls open(path, "w"): a stand-in for any code a pickle can run."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return open, (self.path, "w")


def test_hostile_metadata_in_a_checkpoint_is_refused_and_runs_nothing(tmp_path, uninterrupted):
    import pickle

    _, source_dir = uninterrupted
    checkpoint = os.path.join(tmp_path, "hostile_step")
    shutil.copytree(os.path.join(source_dir, "step_8"), checkpoint)
    created = os.path.join(tmp_path, "pwned")
    with open(os.path.join(checkpoint, "policy", ".metadata"), "wb") as handle:
        pickle.dump(_CreatesAFile(created), handle)
    records, result = run_dpo(tmp_path, 1, ["dpo.max_num_steps=1", f"policy.model_name={checkpoint}"], check=False)
    assert _rank_exit_code(result) == 2 and not records, result.stderr[-3000:]
    assert f"policy.model_name={checkpoint!r} cannot be loaded" in result.stderr
    assert "references io.open" in result.stderr and "could run code" in result.stderr
    assert not os.path.exists(created)


def test_two_ranks_tokenize_each_data_set_once_and_a_restart_reuses_it(tmp_path):
    """Issue 13: one process builds the tokenized cache while the other waits; a restart tokenizes nothing."""
    _, result = run_dpo(tmp_path, 2, ["dpo.max_num_steps=1", "dpo.val_period=1"])
    assert "(train): built by 1 of 2 processes" in result.stderr and "(val): built by 1 of 2 processes" in result.stderr
    _, result = run_dpo(tmp_path, 2, ["dpo.max_num_steps=2", "dpo.val_period=1"])
    assert "(train): reused" in result.stderr and "(val): reused" in result.stderr
    assert "building the tokenized cache" not in result.stderr
