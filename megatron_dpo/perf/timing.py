"""Wall-clock split of a step: phases, time inside torch.distributed, memory.

``PhaseTimer`` is the ``timer`` train_step accepts: it sums the wall time of
its "reference" / "policy" / "optimizer" phases (device-synchronised).
``CommTimer`` wraps torch.distributed's collectives and point-to-point calls
(and the ``wait()`` of their async handles) and sums the wall time spent in
them: transfers plus waiting for other ranks (pipeline bubbles and load
imbalance show up here). Calls are counted whichever phase makes them.
``isend`` / ``irecv`` stay unwrapped (``P2POp`` accepts only the originals), so
the interleaved pipeline's unbatched p2p (batch_p2p_comm=False) is missed. It is
benchmark instrumentation: ``install()`` (through
``compat.instrument_collectives``, the project's one place that patches a
library) must run before megatron-core is imported, and nothing in training
installs it.
"""

import functools
import threading
import time
from collections import defaultdict
from contextlib import contextmanager

import torch
import torch.distributed as dist

from megatron_dpo.parallel import compat



def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class _TimedWork:
    """An async handle whose wait() counts as communication time."""

    def __init__(self, work, timer: "CommTimer"):
        self._work, self._timer = work, timer

    def wait(self, *args, **kwargs):
        with self._timer.timing():
            return self._work.wait(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._work, name)


def _timed_handles(result, timer: "CommTimer"):
    if isinstance(result, list):
        return [_timed_handles(item, timer) for item in result]
    return _TimedWork(result, timer) if isinstance(result, dist.Work) else result


class CommTimer:
    def __init__(self):
        self.seconds = 0.0
        self.calls = 0
        self._depth = 0  # a wrapped call inside another counts once

    @contextmanager
    def timing(self):
        self._depth += 1
        start = time.perf_counter()
        try:
            yield
        finally:
            self._depth -= 1
            if self._depth == 0:
                synchronize()  # on GPU this serialises overlapped communication: an upper bound
                self.seconds += time.perf_counter() - start
                self.calls += 1

    def _wrap(self, function):
        @functools.wraps(function)
        def timed(*args, **kwargs):
            with self.timing():
                return _timed_handles(function(*args, **kwargs), self)

        return timed

    def install(self) -> "CommTimer":
        compat.instrument_collectives(self._wrap)
        return self

    def reset(self) -> None:
        self.seconds, self.calls = 0.0, 0


class PhaseTimer:
    def __init__(self):
        self.seconds = defaultdict(float)

    @contextmanager
    def __call__(self, phase: str):
        synchronize()
        start = time.perf_counter()
        try:
            yield
        finally:
            synchronize()
            self.seconds[phase] += time.perf_counter() - start


def _release_free_heap() -> None:
    """Hand freed malloc memory back to the OS (glibc), so that RSS rises with
    what the next step allocates rather than staying at an earlier high."""
    import ctypes
    import ctypes.util

    libc = ctypes.util.find_library("c")
    if libc:
        ctypes.CDLL(libc).malloc_trim(0)


class PeakRss:
    """Peak resident set size while the context runs, sampled every
    ``interval`` seconds by a thread (torch kernels release the GIL). Free heap
    is handed back first, so the rise over the starting RSS is what the
    context itself allocates at its peak (activations, gradients, buffers)."""

    def __init__(self, interval: float = 0.005):
        import psutil

        self.interval, self._process = interval, psutil.Process()
        self.start = self.peak = 0

    def _poll(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, self._process.memory_info().rss)

    def __enter__(self) -> "PeakRss":
        _release_free_heap()
        self.start = self.peak = self._process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._process.memory_info().rss)
