"""Small file helpers shared by the logging sinks.

A run can be killed at any moment (preemption, Ctrl-C, OOM); readers of
``summary.json``, ``metrics.png`` and a rewritten ``metrics.jsonl`` must never
see half a file, so every whole-file write goes through a temporary name and
``os.replace`` (atomic on POSIX within one directory).
"""

import contextlib
import math
import os
from typing import Any, Iterator


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """Yield a temporary path beside ``path``; on success move it into place.

    On an exception the temporary file is removed and ``path`` is untouched.
    """
    tmp_path = f"{path}.tmp.{os.getpid()}"
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)


def json_safe(value: Any) -> Any:
    """Replace non-finite floats (recursively) with None.

    ``json.dumps`` would write ``NaN``/``Infinity``, which is not JSON: jq,
    pandas' strict readers and browsers reject the whole file.
    """
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    return value
