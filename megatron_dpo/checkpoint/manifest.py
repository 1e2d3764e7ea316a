"""A step directory's manifest: every file, its size and checksum, written last.

The saver writes all files into ``.tmp_step_N/``; each rank hashes the files
it wrote (``file_entries``), rank 0 gathers them and writes the manifest (the
last file, ``write_manifest``), then renames the directory to ``step_N/``.
A reader checks the directory against the manifest before trusting it:

- ``size``: every listed file exists with its listed size, and nothing else
  is there. Catches deletion, truncation and files of an interrupted copy.
  Costs one ``stat`` per file.
- ``full``: sizes, then the checksum of every byte. Also catches flipped
  bytes. Costs one read of the checkpoint: split over the ranks that resume
  (``rank``/``world_size``), each rank hashes about ``1 / world_size`` of the
  bytes. xxh3-128 runs at several GB/s per core, so the storage's read
  bandwidth sets the cost.

A failure raises ``CheckpointCorrupt`` naming the file and what is wrong. With
``world_size > 1`` each rank checks only its share: combine the verdicts
(e.g. all-reduce a flag) so that every rank falls back together.

``manifest.json``::

    {"format": 1, "checksum": "xxh3_128",
     "files": {"policy/__0_0.distcp": {"size": 1783535, "xxh3_128": "6f1c..."}, ...}}
"""

import json
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List, Optional

import xxhash

from megatron_dpo.checkpoint.files import MANIFEST_FILE

VERIFY_MODES = ("size", "full")
CHECKSUM = "xxh3_128"
FORMAT = 1
_CHUNK_BYTES = 8 << 20
_DEFAULT_THREADS = 4


class CheckpointCorrupt(Exception):
    """A step directory does not match its manifest: ``path`` names the file."""

    def __init__(self, path: str, problem: str):
        super().__init__(f"{path}: {problem}")
        self.path = path
        self.problem = problem


def file_checksum(path: str) -> str:
    """xxh3-128 of the file's bytes (hex), read in 8 MiB chunks."""
    digest = xxhash.xxh3_128()
    buffer = bytearray(_CHUNK_BYTES)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as handle:
        while True:
            count = handle.readinto(buffer)
            if not count:
                return digest.hexdigest()
            digest.update(view[:count])


def _list_files(directory: str) -> List[str]:
    """Relative paths of every file under ``directory`` except the manifest, sorted."""
    found = []
    for root, dirs, files in os.walk(directory):
        dirs.sort()
        for name in files:
            relative = os.path.relpath(os.path.join(root, name), directory)
            if relative != MANIFEST_FILE:
                found.append(relative.replace(os.sep, "/"))
    return sorted(found)


def _map_threads(function, items: List[str], num_threads: Optional[int]) -> List:
    num_threads = num_threads or min(_DEFAULT_THREADS, os.cpu_count() or 1)
    if num_threads <= 1 or len(items) <= 1:
        return [function(item) for item in items]
    with ThreadPoolExecutor(num_threads) as pool:
        return list(pool.map(function, items))


def file_entries(directory: str, names: List[str], num_threads: Optional[int] = None) -> Dict[str, dict]:
    """``{name: {"size", "xxh3_128"}}`` for files under ``directory`` (relative
    paths). Each rank calls it on the files it wrote, while they are in its
    page cache, and rank 0 gathers the results into ``write_manifest``."""
    checksums = _map_threads(lambda name: file_checksum(os.path.join(directory, name)), names, num_threads)
    return {name: {"size": os.path.getsize(os.path.join(directory, name)), CHECKSUM: checksum}
            for name, checksum in zip(names, checksums)}


def write_manifest(directory: str, entries: Optional[Dict[str, dict]] = None,
                   num_threads: Optional[int] = None) -> str:
    """Write ``manifest.json`` (durably) listing every file under ``directory``.

    ``entries``: ``file_entries`` the ranks computed for the files they wrote;
    every other file is hashed here. Call it once every other file is written
    and closed, before the rename that publishes the directory. Returns the
    manifest's path.
    """
    entries = dict(entries or {})
    names = _list_files(directory)
    unknown = sorted(set(entries) - set(names))
    assert not unknown, f"entries for files that are not in {directory}: {unknown}"
    entries.update(file_entries(directory, [name for name in names if name not in entries], num_threads))
    for name, entry in entries.items():
        size = os.path.getsize(os.path.join(directory, name))
        assert size == entry["size"], f"{name} changed after it was hashed ({entry['size']} -> {size} bytes)"
    path = os.path.join(directory, MANIFEST_FILE)
    with open(path, "w", encoding="utf-8") as handle:
        json.dump({"format": FORMAT, "checksum": CHECKSUM, "files": entries}, handle, indent=1, sort_keys=True)
        handle.flush()
        os.fsync(handle.fileno())
    return path


def read_manifest(directory: str) -> Dict[str, dict]:
    """The manifest's ``files`` table; CheckpointCorrupt when it is missing or unreadable."""
    path = os.path.join(directory, MANIFEST_FILE)
    if not os.path.isfile(path):
        raise CheckpointCorrupt(path, "missing (the save did not finish, or the directory was not written by this "
                                      "version of megatron_dpo)")
    try:
        with open(path, encoding="utf-8") as handle:
            manifest = json.load(handle)
        files = manifest["files"]
        if manifest.get("format") != FORMAT or manifest.get("checksum") != CHECKSUM or not isinstance(files, dict):
            raise ValueError(f"format {manifest.get('format')!r}, checksum {manifest.get('checksum')!r}")
        for name, entry in files.items():
            if not isinstance(entry.get("size"), int) or not isinstance(entry.get(CHECKSUM), str):
                raise ValueError(f"bad entry for {name!r}")
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise CheckpointCorrupt(path, f"unreadable manifest ({error})") from error
    return files


def share_of(files: Dict[str, dict], rank: int, world_size: int) -> List[str]:
    """The files ``rank`` checks: largest first to the least-loaded rank, so
    each rank reads about ``1 / world_size`` of the bytes. Deterministic."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
    loads = [0] * world_size
    mine = []
    for name in sorted(files, key=lambda n: (-files[n]["size"], n)):
        owner = min(range(world_size), key=lambda r: (loads[r], r))
        loads[owner] += files[name]["size"]
        if owner == rank:
            mine.append(name)
    return sorted(mine)


def _check_size(directory: str, name: str, entry: dict) -> None:
    path = os.path.join(directory, name)
    if not os.path.isfile(path):
        raise CheckpointCorrupt(path, "missing (listed in the manifest)")
    size = os.path.getsize(path)
    if size < entry["size"]:
        raise CheckpointCorrupt(path, f"truncated: {size} bytes, the manifest says {entry['size']}")
    if size != entry["size"]:
        raise CheckpointCorrupt(path, f"size {size} bytes, the manifest says {entry['size']}")


def _check_checksum(directory: str, name: str, entry: dict) -> None:
    path = os.path.join(directory, name)
    checksum = file_checksum(path)
    if checksum != entry[CHECKSUM]:
        raise CheckpointCorrupt(path, f"checksum mismatch ({CHECKSUM} {checksum}, the manifest says "
                                      f"{entry[CHECKSUM]}): the file's bytes changed after the save")


def verify_manifest(directory: str, mode: str = "size", *, rank: int = 0, world_size: int = 1,
                    num_threads: Optional[int] = None) -> None:
    """Check ``directory`` against its manifest; raises CheckpointCorrupt.

    ``mode``: ``size`` or ``full`` (see the module docstring). With
    ``world_size > 1`` this rank checks its ``share_of`` the files, and rank 0
    also that no file outside the manifest is present. Sizes are checked
    before any byte is hashed.
    """
    if mode not in VERIFY_MODES:
        raise ValueError(f"verify mode {mode!r}: use one of {VERIFY_MODES}")
    files = read_manifest(directory)
    if rank == 0:
        unexpected = sorted(set(_list_files(directory)) - set(files))
        if unexpected:
            shown = ", ".join(unexpected[:5]) + (f" and {len(unexpected) - 5} more" if len(unexpected) > 5 else "")
            raise CheckpointCorrupt(os.path.join(directory, unexpected[0]),
                                    f"unexpected: not in the manifest ({len(unexpected)} such files: {shown})")
    mine = share_of(files, rank, world_size)
    for name in mine:
        _check_size(directory, name, files[name])
    if mode == "full":
        _map_threads(lambda name: _check_checksum(directory, name, files[name]), mine, num_threads)
