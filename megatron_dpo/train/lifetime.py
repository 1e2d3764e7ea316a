"""No process outlives the one that started it.

A rank runs under a torchrun agent and starts processes of its own:
dist_checkpointing forks file writers during a save and spawns a
multiprocessing manager for their results. A SIGKILL runs no handler, so a
dead agent leaves its ranks running (the next run on the same directory then
races them), and a dead rank leaves its helpers running, holding memory (on a
GPU node, device memory) into the next job. So each process watches its
parent and ends when the parent is gone:

- a rank under torchrun (``TORCHELASTIC_RUN_ID`` set) polls its parent pid
  and, once the agent is gone, kills its own process group (torchrun makes
  each rank a session leader, so that is the rank and its helpers);
- a process forked by a rank (``os.register_at_fork``), or spawned by it (a
  fresh interpreter that imports the main script as ``__mp_main__``:
  scripts/run_dpo.py calls ``end_with_spawning_parent``), polls its parent pid.
Each ends within ``POLL_SECONDS`` of its parent, without a handler to run.
A watch can only know its parent while the parent lives: an agent killed
before the watch starts leaves the rank orphaned and unwatched, so
scripts/run_dpo.py starts it first thing, before the heavy imports.
(multiprocessing's resource tracker ends by itself once every process holding
its pipe has ended.)
"""

import os
import signal
import threading
import time

POLL_SECONDS = 1.0
EXIT_ORPHANED = 70  # EX_SOFTWARE: the parent is gone; only ever seen by a reaper


def _watch_parent_pid(parent: int, on_orphaned) -> None:
    def watch():
        while os.getppid() == parent:
            time.sleep(POLL_SECONDS)
        on_orphaned()

    threading.Thread(target=watch, name="end-with-parent", daemon=True).start()


def _end_group_or_self() -> None:
    if os.getpgid(0) == os.getpid():  # a session / group leader: take the helpers along
        os.killpg(os.getpid(), signal.SIGKILL)
    os._exit(EXIT_ORPHANED)


def _after_fork_in_child() -> None:
    _watch_parent_pid(os.getppid(), lambda: os._exit(EXIT_ORPHANED))


_installed = False


def end_with_parent() -> None:
    """Install the watches of this rank (under torchrun) and of the processes it forks. Idempotent."""
    global _installed
    if _installed:
        return
    _installed = True
    os.register_at_fork(after_in_child=_after_fork_in_child)
    if "TORCHELASTIC_RUN_ID" in os.environ:
        _watch_parent_pid(os.getppid(), _end_group_or_self)


def end_with_spawning_parent() -> None:
    """In a process a rank spawned (multiprocessing's spawn imports the main
    script while it prepares the child): end when the rank ends."""
    _after_fork_in_child()
