"""Checkpoint integrity without a process group: the step manifest (sizes,
checksums, per-rank shares), the run lock (one writer per checkpoint_dir, stale
locks taken over) and the run-directory marker."""

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import psutil
import pytest

from megatron_dpo.checkpoint.lock import (
    LOCK_FILE,
    RUN_MARKER,
    RunDirLocked,
    RunDirRefused,
    acquire_run_lock,
    check_run_dir,
    mark_run_dir,
)
from megatron_dpo.checkpoint.manifest import (
    MANIFEST_FILE,
    CheckpointCorrupt,
    file_entries,
    share_of,
    verify_manifest,
    write_manifest,
)

# One file of each kind a step directory holds (names as megatron-core and the saver write them).
STEP_FILES = {
    "policy/__0_0.distcp": 40_000, "policy/__1_0.distcp": 30_000, "policy/.metadata": 3_000,
    "policy/common.pt": 2_000, "policy/metadata.json": 119, "train_state.json": 1_399, "rng_rank0.pt": 2_264,
    "rng_rank1.pt": 2_264, "config.yaml": 1_965, "model_arch.json": 431, "tokenizer/tokenizer.json": 5_000,
    "tokenizer/tokenizer_config.json": 283,
}


def _step_dir(root) -> str:
    directory = os.path.join(root, ".tmp_step_3")
    for index, (name, size) in enumerate(sorted(STEP_FILES.items())):
        path = os.path.join(directory, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as handle:
            handle.write(bytes((index + i) % 251 for i in range(size)))
    write_manifest(directory)
    return directory


# -- manifest -------------------------------------------------------------------

def test_manifest_lists_every_file_with_size_and_checksum_and_verifies(tmp_path):
    directory = _step_dir(tmp_path)
    with open(os.path.join(directory, MANIFEST_FILE)) as handle:
        manifest = json.load(handle)
    assert sorted(manifest["files"]) == sorted(STEP_FILES)
    assert {name: entry["size"] for name, entry in manifest["files"].items()} == STEP_FILES
    assert all(len(entry["xxh3_128"]) == 32 for entry in manifest["files"].values())
    verify_manifest(directory, "size")
    verify_manifest(directory, "full")


def test_entries_hashed_by_the_writing_ranks_are_used_and_the_rest_hashed_by_rank_0(tmp_path):
    directory = _step_dir(tmp_path)
    with open(os.path.join(directory, MANIFEST_FILE)) as handle:
        expected = json.load(handle)
    rank_files = [["policy/__0_0.distcp", "rng_rank0.pt"], ["policy/__1_0.distcp", "rng_rank1.pt"]]
    gathered = {}
    for names in rank_files:  # what an all_gather_object of each rank's file_entries brings to rank 0
        gathered.update(file_entries(directory, names))
    write_manifest(directory, gathered)
    with open(os.path.join(directory, MANIFEST_FILE)) as handle:
        assert json.load(handle) == expected
    with pytest.raises(AssertionError, match="policy/__0_0.distcp changed after it was hashed"):
        write_manifest(directory, dict(gathered, **{"policy/__0_0.distcp": {"size": 1, "xxh3_128": "0"}}))


def _truncate(path):
    with open(path, "r+b") as handle:
        handle.truncate(os.path.getsize(path) // 2)


def _flip(path):
    with open(path, "r+b") as handle:
        handle.seek(os.path.getsize(path) // 3)
        byte = handle.read(1)
        handle.seek(-1, os.SEEK_CUR)
        handle.write(bytes([byte[0] ^ 0xFF]))


@pytest.mark.parametrize("name", sorted(STEP_FILES))
def test_truncation_deletion_and_byte_flip_of_every_kind_of_file_are_named(tmp_path, name):
    for damage, modes, problem in ((_truncate, ("size", "full"), "truncated"),
                                   (os.remove, ("size", "full"), "missing"),
                                   (_flip, ("full",), "checksum mismatch")):
        directory = _step_dir(tmp_path / damage.__name__)
        damage(os.path.join(directory, name))
        for mode in modes:
            with pytest.raises(CheckpointCorrupt, match=problem) as caught:
                verify_manifest(directory, mode)
            assert caught.value.path == os.path.join(directory, name)
        if damage is _flip:
            verify_manifest(directory, "size")  # same size: only a checksum sees a flipped byte


def test_unexpected_file_grown_file_and_bad_manifest_are_named(tmp_path):
    directory = _step_dir(tmp_path)
    with open(os.path.join(directory, "policy", "__9_0.distcp"), "wb") as handle:
        handle.write(b"x")
    with pytest.raises(CheckpointCorrupt, match=r"policy/__9_0.distcp: unexpected: not in the manifest"):
        verify_manifest(directory, "size")
    os.remove(os.path.join(directory, "policy", "__9_0.distcp"))
    with open(os.path.join(directory, "config.yaml"), "ab") as handle:
        handle.write(b"more")
    with pytest.raises(CheckpointCorrupt, match=r"config.yaml: size 1969 bytes, the manifest says 1965"):
        verify_manifest(directory, "size")
    with open(os.path.join(directory, MANIFEST_FILE), "w") as handle:
        handle.write('{"format": 1, "files": {')
    with pytest.raises(CheckpointCorrupt, match=r"manifest.json: unreadable manifest"):
        verify_manifest(directory, "size")
    os.remove(os.path.join(directory, MANIFEST_FILE))
    with pytest.raises(CheckpointCorrupt, match=r"manifest.json: missing"):
        verify_manifest(directory, "full")
    with pytest.raises(ValueError, match="verify mode 'fast'"):
        verify_manifest(directory, "fast")


def test_ranks_share_the_bytes_and_each_checks_only_its_share(tmp_path):
    files = {name: {"size": size} for name, size in STEP_FILES.items()}
    shares = [share_of(files, rank, 3) for rank in range(3)]
    assert sorted(sum(shares, [])) == sorted(STEP_FILES)  # every file once
    loads = [sum(STEP_FILES[name] for name in share) for share in shares]
    assert max(loads) <= max(STEP_FILES.values())  # the largest file alone bounds the imbalance
    directory = _step_dir(tmp_path)
    victim = shares[1][0]
    _flip(os.path.join(directory, victim))
    verify_manifest(directory, "full", rank=0, world_size=3)
    verify_manifest(directory, "full", rank=2, world_size=3)
    with pytest.raises(CheckpointCorrupt, match="checksum mismatch"):
        verify_manifest(directory, "full", rank=1, world_size=3, num_threads=2)


# -- run lock -------------------------------------------------------------------

HOLD = """
import sys, time
from megatron_dpo.checkpoint.lock import acquire_run_lock
lock = acquire_run_lock(sys.argv[1])
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
"""


def _holder(directory, seconds):
    """A process that takes the lock of ``directory`` and holds it for ``seconds``."""
    process = subprocess.Popen([sys.executable, "-c", HOLD, str(directory), str(seconds)],
                               stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "locked"
    return process


def test_second_run_is_refused_within_10_s_naming_the_holder(tmp_path):
    holder = _holder(tmp_path, 60)
    try:
        start = time.monotonic()
        with pytest.raises(RunDirLocked) as caught:
            acquire_run_lock(str(tmp_path))
        assert time.monotonic() - start < 10
        message = str(caught.value)
        assert f"host {socket.gethostname()}, pid {holder.pid}, Slurm job " in message
        assert "pick another checkpointing.checkpoint_dir" in message and f"remove {tmp_path / LOCK_FILE}" in message
    finally:
        holder.kill()
        holder.wait()


def test_lock_of_a_killed_run_is_taken_over_with_a_warning(tmp_path):
    holder = _holder(tmp_path, 60)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    with pytest.warns(UserWarning, match=rf"taking over the stale run lock .*pid {holder.pid}.*no longer runs"):
        lock = acquire_run_lock(str(tmp_path))
    with open(tmp_path / LOCK_FILE) as handle:
        assert json.load(handle)["pid"] == os.getpid()
    lock.release()
    assert not (tmp_path / LOCK_FILE).exists()
    acquire_run_lock(str(tmp_path)).release()  # free again


def _write_lock(directory, **fields):
    holder = {"host": socket.gethostname(), "pid": os.getpid(), "pid_namespace": None, "job_id": None,
              "restart_count": 0, "start_time": time.time(), "token": "theirs"}
    holder["pid_namespace"] = os.readlink("/proc/self/ns/pid") if os.path.exists("/proc/self/ns/pid") else None
    holder.update(fields)
    with open(os.path.join(directory, LOCK_FILE), "w") as handle:
        json.dump(holder, handle)


def test_a_reused_pid_is_not_mistaken_for_the_holder(tmp_path):
    _write_lock(tmp_path, start_time=psutil.Process().create_time() - 100)  # our pid, from before we started
    with pytest.warns(UserWarning, match="no longer runs"):
        acquire_run_lock(str(tmp_path)).release()
    _write_lock(tmp_path)  # our pid, taken after we started: this process holds it
    with pytest.raises(RunDirLocked):
        acquire_run_lock(str(tmp_path))


@pytest.fixture
def fake_squeue(tmp_path, monkeypatch):
    """squeue on PATH answering from $FAKE_SQUEUE_STATE (empty: 'Invalid job id')."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "squeue"
    script.write_text(textwrap.dedent("""\
        #!/bin/sh
        if [ -z "$FAKE_SQUEUE_STATE" ]; then
            echo "slurm_load_jobs error: Invalid job id specified" >&2; exit 1
        fi
        echo "$FAKE_SQUEUE_STATE"
    """))
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    return monkeypatch


def test_slurm_holders_on_other_hosts(tmp_path, fake_squeue):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    _write_lock(run_dir, host="node-17", pid=4242, job_id="1001")
    fake_squeue.setenv("FAKE_SQUEUE_STATE", "RUNNING")
    with pytest.raises(RunDirLocked, match="host node-17, pid 4242, Slurm job 1001"):
        acquire_run_lock(str(run_dir))
    fake_squeue.setenv("FAKE_SQUEUE_STATE", "")
    with pytest.warns(UserWarning, match="Slurm job 1001 is no longer running"):
        acquire_run_lock(str(run_dir)).release()
    _write_lock(run_dir, host="node-17", pid=4242, job_id=None)  # no way to check: live
    with pytest.raises(RunDirLocked, match="Slurm job none"):
        acquire_run_lock(str(run_dir))
    _write_lock(run_dir, host="node-17", pid=4242, job_id="1002", restart_count=0)
    fake_squeue.setenv("SLURM_JOB_ID", "1002")
    fake_squeue.setenv("FAKE_SQUEUE_STATE", "RUNNING")  # our own job: squeue cannot tell
    with pytest.raises(RunDirLocked):
        acquire_run_lock(str(run_dir))
    fake_squeue.setenv("SLURM_RESTART_COUNT", "1")
    with pytest.warns(UserWarning, match=r"Slurm job 1002 was requeued \(restart 0 -> 1\)"):
        acquire_run_lock(str(run_dir)).release()


RACE = """
import sys, time
from megatron_dpo.checkpoint.lock import RunDirLocked, acquire_run_lock
while time.time() < float(sys.argv[2]):
    time.sleep(0.001)
try:
    lock = acquire_run_lock(sys.argv[1])
    print("won", flush=True)
    time.sleep(3)
except RunDirLocked:
    print("refused", flush=True)
"""


def test_racing_runs_take_over_a_stale_lock_once(tmp_path):
    _write_lock(tmp_path, start_time=psutil.Process().create_time() - 100)  # stale
    start_at = time.time() + 4
    racers = [subprocess.Popen([sys.executable, "-W", "ignore", "-c", RACE, str(tmp_path), str(start_at)],
                               stdout=subprocess.PIPE, text=True) for _ in range(3)]
    outcomes = sorted(racer.communicate(timeout=60)[0].strip() for racer in racers)
    assert outcomes == ["refused", "refused", "won"]


# -- run directory marker ---------------------------------------------------------

def test_user_directory_is_refused_and_ours_or_empty_accepted(tmp_path):
    check_run_dir(str(tmp_path / "new"))
    (tmp_path / "empty").mkdir()
    check_run_dir(str(tmp_path / "empty"))
    user = tmp_path / "user"
    user.mkdir()
    (user / "config.yaml").write_text("mine")
    with pytest.raises(RunDirRefused, match=rf"checkpoint_dir='{user}' is not empty \(config.yaml\) and has no "
                                            rf"{RUN_MARKER} marker.*Pick an empty or new directory"):
        check_run_dir(str(user))
    assert (user / "config.yaml").read_text() == "mine"
    mark_run_dir(str(tmp_path / "ours"))
    (tmp_path / "ours" / "metrics.jsonl").write_text("")
    check_run_dir(str(tmp_path / "ours"))
    with pytest.raises(RunDirRefused, match="is a file"):
        check_run_dir(str(user / "config.yaml"))


def test_run_dir_of_a_version_before_the_marker_is_accepted(tmp_path):
    """A complete step_N of ours (train_state.json, model_arch.json, policy/)
    marks a run dir written before markers existed; a look-alike does not."""
    step = tmp_path / "old_run" / "step_3"
    (step / "policy").mkdir(parents=True)
    (step / "train_state.json").write_text("{}")
    with pytest.raises(RunDirRefused):
        check_run_dir(str(tmp_path / "old_run"))  # no model_arch.json: not ours
    (step / "model_arch.json").write_text("{}")
    check_run_dir(str(tmp_path / "old_run"))


def test_this_process_can_take_its_own_lock_again(tmp_path):
    """Several runs set up in one process (scripts/benchmark.py, the layout tests) share its lock."""
    lock = acquire_run_lock(str(tmp_path))
    assert acquire_run_lock(str(tmp_path)) is lock
    lock.release()
    assert not (tmp_path / LOCK_FILE).exists()
