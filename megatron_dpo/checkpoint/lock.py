"""One writer per run directory, and only directories that are ours.

Rank 0, before anything is written to ``checkpointing.checkpoint_dir``:

    check_run_dir(path)            # a user's non-empty directory is refused
    mark_run_dir(path)             # .megatron_dpo_run: this directory is ours
    lock = acquire_run_lock(path)  # .megatron_dpo.lock: host, pid, Slurm job
    ...
    lock.release()                 # also at interpreter exit

A second run on the same directory is refused, naming the holder. A lock
whose holder is gone is taken over with a warning:

- same host (and pid namespace): the pid no longer runs, or now belongs to a
  process started after the lock was taken (pid reuse);
- same Slurm job id with a higher ``SLURM_RESTART_COUNT``: the job was
  requeued and this is its next incarnation;
- another Slurm job that ``squeue`` no longer lists as pending or running.

A holder on another host without Slurm information cannot be checked: it is
treated as live and the error says how to remove the lock. Lock decisions
are serialised by ``flock`` on a guard file, so two runs starting together
cannot both take over one stale lock.
"""

import atexit
import datetime
import fcntl
import json
import os
import shutil
import socket
import subprocess
import time
import uuid
import warnings
from dataclasses import asdict, dataclass
from typing import Dict, Optional

import psutil

from megatron_dpo.checkpoint.files import STEP_DIR, is_complete, is_model_dir
from megatron_dpo.config.errors import ConfigError

LOCK_FILE = ".megatron_dpo.lock"
GUARD_FILE = ".megatron_dpo.lock.guard"
RUN_MARKER = ".megatron_dpo_run"
_SQUEUE_TIMEOUT_S = 5
# squeue states of a job that may still write (man squeue, JOB STATE CODES).
_ACTIVE_SLURM_STATES = {
    "PENDING", "RUNNING", "SUSPENDED", "COMPLETING", "CONFIGURING", "RESIZING", "REQUEUED", "REQUEUE_FED",
    "REQUEUE_HOLD", "RESV_DEL_HOLD", "SIGNALING", "STAGE_OUT", "STOPPED", "SPECIAL_EXIT",
}


class RunDirLocked(ConfigError):
    """Another live run holds the lock of this checkpoint_dir."""


class RunDirRefused(ConfigError):
    """checkpoint_dir holds files megatron_dpo did not write."""


@dataclass(frozen=True)
class LockHolder:
    host: str
    pid: int
    pid_namespace: Optional[str]
    job_id: Optional[str]  # SLURM_JOB_ID
    restart_count: int  # SLURM_RESTART_COUNT (requeues of the job)
    start_time: float  # time.time() when the lock was taken
    token: str

    def describe(self) -> str:
        started = datetime.datetime.fromtimestamp(self.start_time).isoformat(timespec="seconds")
        job = "none" if self.job_id is None else f"{self.job_id} (restart {self.restart_count})"
        return f"host {self.host}, pid {self.pid}, Slurm job {job}, started {started}"


def _pid_namespace() -> Optional[str]:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def _this_process() -> LockHolder:
    return LockHolder(
        host=socket.gethostname(), pid=os.getpid(), pid_namespace=_pid_namespace(),
        job_id=os.environ.get("SLURM_JOB_ID"), restart_count=int(os.environ.get("SLURM_RESTART_COUNT", "0")),
        start_time=time.time(), token=uuid.uuid4().hex,
    )


def _read_holder(path: str) -> Optional[LockHolder]:
    """The lock's holder; None when the file is unreadable (not one we wrote)."""
    try:
        with open(path, encoding="utf-8") as handle:
            return LockHolder(**json.load(handle))
    except (OSError, UnicodeDecodeError, ValueError, TypeError):
        return None


def _slurm_job_active(job_id: str) -> Optional[bool]:
    """True/False per ``squeue``; None when it cannot tell (no squeue, no controller)."""
    if shutil.which("squeue") is None:
        return None
    try:
        result = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True,
                                timeout=_SQUEUE_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if result.returncode != 0:
        return False if "invalid job id" in result.stderr.lower() else None
    states = set(result.stdout.split())
    return bool(states & _ACTIVE_SLURM_STATES)


def _process_alive(holder: LockHolder) -> bool:
    """The holder's pid runs a process started no later than the lock (not a reused pid)."""
    try:
        created = psutil.Process(holder.pid).create_time()
    except psutil.NoSuchProcess:  # a zombie too: it has exited
        return False
    except psutil.AccessDenied:
        return True
    return created <= holder.start_time + 1.0


def _stale_reason(holder: LockHolder, me: LockHolder) -> Optional[str]:
    """Why the holder is gone, or None when it is (or may be) alive."""
    if holder.host == me.host and holder.pid_namespace == me.pid_namespace:
        return None if _process_alive(holder) else f"process {holder.pid} on {holder.host} no longer runs"
    if holder.job_id is None:
        return None
    if holder.job_id == me.job_id:
        if holder.restart_count < me.restart_count:
            return f"Slurm job {holder.job_id} was requeued (restart {holder.restart_count} -> {me.restart_count})"
        return None
    if _slurm_job_active(holder.job_id) is False:
        return f"Slurm job {holder.job_id} is no longer running (squeue)"
    return None


class RunLock:
    """The lock this process holds; ``release`` is idempotent and runs at exit."""

    def __init__(self, path: str, holder: LockHolder):
        self.path = path
        self.holder = holder
        _HELD[os.path.realpath(path)] = self
        atexit.register(self.release)

    def release(self) -> None:
        """Remove the lock file if it is still ours."""
        current = _read_holder(self.path)
        if current is not None and current.token == self.holder.token:
            os.remove(self.path)
        _HELD.pop(os.path.realpath(self.path), None)
        atexit.unregister(self.release)

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _write_lock(path: str, holder: LockHolder, replace: bool) -> None:
    """Create the lock file (O_EXCL) or, taking over, swap the content in atomically."""
    content = json.dumps(asdict(holder), indent=1).encode()
    target = f"{path}.{holder.token}" if replace else path
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        os.write(fd, content)
        os.fsync(fd)
    finally:
        os.close(fd)
    if replace:
        os.replace(target, path)


def _locked_error(path: str, holder: Optional[LockHolder]) -> RunDirLocked:
    who = "a process whose lock file is unreadable" if holder is None else holder.describe()
    return RunDirLocked(
        f"checkpointing.checkpoint_dir={os.path.dirname(path)!r} is in use by another run ({who}); two runs "
        f"writing one directory lose steps. Wait for that run to end or stop it, or pick another "
        f"checkpointing.checkpoint_dir. If that run is certainly gone (e.g. its node died), remove {path} "
        "and start again."
    )


def acquire_run_lock(checkpoint_dir: str) -> RunLock:
    """Take the run lock of ``checkpoint_dir`` (which must exist); raises RunDirLocked."""
    path = os.path.join(checkpoint_dir, LOCK_FILE)
    me = _this_process()
    with open(os.path.join(checkpoint_dir, GUARD_FILE), "a") as guard:
        try:
            fcntl.flock(guard, fcntl.LOCK_EX)
        except OSError:  # a file system without flock (NFS mounted nolock): O_EXCL still guards creation
            pass
        try:
            _write_lock(path, me, replace=False)
            return RunLock(path, me)
        except FileExistsError:
            pass
        holder = _read_holder(path)
        held = _HELD.get(os.path.realpath(path))
        if held is not None and holder is not None and holder.token == held.holder.token:
            return held  # this process holds it already (several runs set up in one process)
        reason = None if holder is None else _stale_reason(holder, me)
        if reason is None:
            raise _locked_error(path, holder)
        warnings.warn(f"taking over the stale run lock {path} ({holder.describe()}): {reason}")
        _write_lock(path, me, replace=True)
        return RunLock(path, me)


# Locks this process holds, by lock file: a second acquire returns the same lock.
_HELD: Dict[str, "RunLock"] = {}


def check_run_dir(path: str) -> None:
    """Refuse a ``checkpoint_dir`` holding files megatron_dpo did not write.

    Fine: absent, empty, carrying the run marker, or holding a complete
    step_N of ours (a run dir of a version from before the marker). Raises
    RunDirRefused.
    """
    if not os.path.exists(path):
        return
    if not os.path.isdir(path):
        raise RunDirRefused(f"checkpointing.checkpoint_dir={path!r} is a file, not a directory: pick a new directory.")
    names = sorted(os.listdir(path))
    if not names or RUN_MARKER in names or _holds_our_steps(path, names):
        return
    shown = ", ".join(names[:5]) + (f" ... ({len(names)} entries)" if len(names) > 5 else "")
    raise RunDirRefused(
        f"checkpointing.checkpoint_dir={path!r} is not empty ({shown}) and has no {RUN_MARKER} marker, so "
        "megatron_dpo did not create it; a run would overwrite or delete files there. Pick an empty or new "
        f"directory. If it is a megatron_dpo run directory after all, create the marker: "
        f"touch {os.path.join(path, RUN_MARKER)}"
    )


def _holds_our_steps(path: str, names) -> bool:
    """A run dir of a megatron_dpo version from before the marker: it holds a
    step_N directory with our train_state.json and model_arch.json."""
    steps = [os.path.join(path, name) for name in names if STEP_DIR.match(name)]
    return any(is_complete(step) and is_model_dir(step) for step in steps)


def mark_run_dir(path: str) -> None:
    """Create ``path`` if needed and mark it as a megatron_dpo run directory."""
    os.makedirs(path, exist_ok=True)
    marker = os.path.join(path, RUN_MARKER)
    if not os.path.exists(marker):
        with open(marker, "w", encoding="utf-8") as handle:
            json.dump({"created_by": "megatron_dpo", "created": time.time()}, handle)
