"""Tokenize once: a data set's tokenized pairs in a memory-mapped Arrow file.

Layout, under the ``cache_dir`` the caller gives (one per node, or one on a
shared filesystem):
  <cache_dir>/<key>/pairs.arrow   one row per kept pair (datasets' Arrow format)
  <cache_dir>/<key>/meta.json     counts, pairs fingerprint, what the key covers
  <cache_dir>/<key>.lock          taken while building
The key is a SHA-256 of the data's bytes, the tokenizer's definition, the
record keys, max length, overlength policy, truncation mode and the cache
format version: a restart finds the same key and tokenizes nothing.

Building is done by one process: every caller takes an exclusive ``fcntl``
lock on ``<key>.lock``; the first builds into a temporary directory and
renames it to ``<key>`` (a directory named by the key is complete), the
others wait on the lock and open what it published. No torch.distributed.
Bad data is raised by the builder as a DataError naming file and line; it
also leaves the message in ``<key>.error``, so the processes that waited
raise the same error instead of each building again.

Reading: ``TokenizedDataset[i]`` slices pair i out of the memory-mapped
columns; no list of all pairs exists in any process, and a rank touches only
the pages of the pairs it reads.
"""

import bisect
import contextlib
import fcntl
import glob
import hashlib
import json
import logging
import operator
import os
import shutil
import tempfile
import time
from dataclasses import asdict
from itertools import islice
from typing import Iterator, List, Optional

import numpy as np

from megatron_dpo.config.schema import DataConfig
from megatron_dpo.data.errors import DataError
from megatron_dpo.data.fingerprint import PairHasher, file_fingerprint, tokenizer_digest
from megatron_dpo.data.formats import iter_pairs
from megatron_dpo.data.tokenize import TokenizedPair, check_not_all_dropped, check_settings, tokenize_chunk

logger = logging.getLogger(__name__)

CACHE_VERSION = 1
ARROW_FILE, META_FILE = "pairs.arrow", "meta.json"
CHUNK_PAIRS = 1024  # pairs tokenized per tokenizer call (bounds the builder's memory), rows per record batch
_IDS = ("chosen_ids", "rejected_ids")
_SCALARS = ("chosen_prompt_len", "rejected_prompt_len", "chosen_reward", "rejected_reward")


def open_tokenized(path: str, data_cfg: DataConfig, tokenizer, max_length: int,
                   cache_dir: str) -> "TokenizedDataset":
    """The tokenized pairs of the data file / dataset directory ``path``:
    opened from ``cache_dir``, or built there first (once, see the module docstring)."""
    check_settings(max_length, data_cfg.overlength_policy, data_cfg.truncation_mode)
    identity = cache_identity(path, data_cfg, tokenizer, max_length)
    key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:24]
    directory = os.path.join(cache_dir, key)
    built_here = False
    if not _published(directory):
        os.makedirs(cache_dir, exist_ok=True)
        error_path = directory + ".error"
        error_before = _stat(error_path)
        with _exclusive_lock(directory + ".lock"):
            if not _published(directory):
                error_now = _stat(error_path)
                if error_now is not None and error_now != error_before:  # the builder we waited for failed
                    with open(error_path, encoding="utf-8") as handle:
                        raise DataError(handle.read())
                _build(path, data_cfg, tokenizer, max_length, identity, directory)
                built_here = True
    dataset = TokenizedDataset(directory)
    dataset.built_here = built_here
    return dataset


def cache_identity(path: str, data_cfg: DataConfig, tokenizer, max_length: int) -> dict:
    """What decides the tokenized pairs (its SHA-256 is the cache key)."""
    cfg = asdict(data_cfg)
    return {
        "version": CACHE_VERSION, "data": file_fingerprint(path), "tokenizer": tokenizer_digest(tokenizer),
        "max_length": max_length, **{name: cfg[name] for name in (
            "prompt_key", "chosen_key", "rejected_key", "overlength_policy", "truncation_mode")},
    }


def _published(directory: str) -> bool:
    return os.path.isfile(os.path.join(directory, META_FILE))


def _stat(path: str) -> Optional[tuple]:
    try:
        stat = os.stat(path)
    except FileNotFoundError:
        return None
    return stat.st_ino, stat.st_mtime_ns, stat.st_size


@contextlib.contextmanager
def _exclusive_lock(lock_path: str) -> Iterator[None]:
    with open(lock_path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _build(path: str, data_cfg: DataConfig, tokenizer, max_length: int, identity: dict, directory: str) -> None:
    """Tokenize ``path`` into ``directory`` (under the lock): write aside, then rename."""
    start = time.perf_counter()
    logger.info("building the tokenized cache of %s in %s ...", path, directory)
    for leftover in [directory, *glob.glob(f"{glob.escape(directory)}.*.tmp")]:  # of a killed builder
        shutil.rmtree(leftover, ignore_errors=True)
    with contextlib.suppress(FileNotFoundError):
        os.remove(directory + ".error")
    temporary = tempfile.mkdtemp(prefix=os.path.basename(directory) + ".", suffix=".tmp",
                                 dir=os.path.dirname(directory))
    try:
        meta = _write_pairs(path, data_cfg, tokenizer, max_length, os.path.join(temporary, ARROW_FILE))
        with open(os.path.join(temporary, META_FILE), "w", encoding="utf-8") as handle:
            json.dump(dict(meta, identity=identity, source=os.path.abspath(path)), handle, indent=1)
        os.rename(temporary, directory)
    except DataError as error:
        shutil.rmtree(temporary, ignore_errors=True)
        with open(directory + ".error", "w", encoding="utf-8") as handle:
            handle.write(str(error))
        raise
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    logger.info("tokenized cache of %s built in %.1f s: %d pairs (%d dropped, %d truncated)", path,
                time.perf_counter() - start, meta["num_pairs"], meta["num_dropped"], meta["num_truncated"])


def _features():
    import datasets

    ids = datasets.List(datasets.Value("int32"))
    return datasets.Features({"chosen_ids": ids, "rejected_ids": ids,
                              "chosen_prompt_len": datasets.Value("int32"),
                              "rejected_prompt_len": datasets.Value("int32"),
                              "chosen_reward": datasets.Value("float64"),
                              "rejected_reward": datasets.Value("float64")})


def _write_pairs(path: str, data_cfg: DataConfig, tokenizer, max_length: int, arrow_path: str) -> dict:
    """Stream the file through tokenization into ``arrow_path``; the meta data."""
    import pyarrow as pa
    from datasets.arrow_writer import ArrowWriter

    features = _features()
    hasher, counts = PairHasher(), {"num_pairs": 0, "num_dropped": 0, "num_truncated": 0}
    has_rewards = None
    pairs = iter_pairs(path, data_cfg)
    with ArrowWriter(features=features, path=arrow_path, writer_batch_size=CHUNK_PAIRS) as writer:
        while chunk := list(islice(pairs, CHUNK_PAIRS)):
            result = tokenize_chunk(chunk, tokenizer, max_length, data_cfg.overlength_policy,
                                    data_cfg.truncation_mode)
            counts["num_pairs"] += len(result.pairs)
            counts["num_dropped"] += result.num_dropped
            counts["num_truncated"] += result.num_truncated
            has_rewards = chunk[0].chosen_reward is not None
            columns = {name: [] for name in _IDS + _SCALARS}
            for pair in result.pairs:
                hasher.add(pair.chosen_ids, pair.rejected_ids, pair.chosen_prompt_len, pair.rejected_prompt_len,
                           pair.chosen_reward, pair.rejected_reward)
                for name in columns:
                    value = getattr(pair, name)
                    columns[name].append(float("nan") if value is None else value)  # no rewards: NaN, not null
            if result.pairs:
                writer.write_table(pa.Table.from_pydict(columns, schema=features.arrow_schema))
        writer.finalize()
    check_not_all_dropped(counts["num_pairs"], counts["num_dropped"], max_length)
    return dict(counts, version=CACHE_VERSION, fingerprint=hasher.hexdigest(), has_rewards=has_rewards)


class TokenizedDataset:
    """The pairs of a published cache directory, read by index from the
    memory-mapped Arrow file. Quacks like ``TokenizeResult``: ``pairs``
    (itself), ``num_dropped``, ``num_truncated``, ``fingerprint`` (that of
    ``fingerprint.pairs_fingerprint`` over all pairs, computed at build) and
    ``set_reference_logps``."""

    def __init__(self, directory: str):
        import datasets

        with open(os.path.join(directory, META_FILE), encoding="utf-8") as handle:
            meta = json.load(handle)
        self.directory = directory
        # Whether this process built the cache (open_tokenized), rather than opened a published one.
        self.built_here = False
        self.num_dropped: int = meta["num_dropped"]
        self.num_truncated: int = meta["num_truncated"]
        self.fingerprint: str = meta["fingerprint"]
        self.has_rewards: bool = meta["has_rewards"]
        # (chosen, rejected) reference log-probs [num_pairs, 2], set after build
        # (reference.mode cached / none); None: computed online.
        self.reference_logps: Optional[np.ndarray] = None
        table = datasets.Dataset.from_file(os.path.join(directory, ARROW_FILE), in_memory=False).data.table
        self._num_pairs = table.num_rows
        assert self._num_pairs == meta["num_pairs"], f"{directory}: {self._num_pairs} rows, meta says {meta}"
        self._starts: List[int] = []
        self._chunks: List[dict] = []
        row = 0
        for batch in table.to_batches():
            self._starts.append(row)
            self._chunks.append(_chunk_views(batch))
            row += batch.num_rows

    @property
    def pairs(self) -> "TokenizedDataset":
        return self

    def __len__(self) -> int:
        return self._num_pairs

    def __iter__(self) -> Iterator[TokenizedPair]:
        return (self[i] for i in range(self._num_pairs))

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(self._num_pairs))]
        index = operator.index(index)
        if index < 0:
            index += self._num_pairs
        if not 0 <= index < self._num_pairs:
            raise IndexError(f"pair {index} of a data set of {self._num_pairs}")
        chunk_index = bisect.bisect_right(self._starts, index) - 1
        chunk, row = self._chunks[chunk_index], index - self._starts[chunk_index]
        chosen, rejected = (chunk[name][1][chunk[name][0][row]:chunk[name][0][row + 1]].tolist() for name in _IDS)
        rewards = ((float(chunk["chosen_reward"][row]), float(chunk["rejected_reward"][row]))
                   if self.has_rewards else (None, None))
        reference = None if self.reference_logps is None else tuple(map(float, self.reference_logps[index]))
        return TokenizedPair(chosen, rejected, int(chunk["chosen_prompt_len"][row]),
                             int(chunk["rejected_prompt_len"][row]), *rewards, reference_logps=reference)

    def set_reference_logps(self, logps) -> None:
        """logps [num_pairs, 2] (chosen, rejected), e.g. a CPU torch tensor."""
        logps = np.asarray(logps)
        if logps.shape != (self._num_pairs, 2):
            raise ValueError(f"reference log-probs of shape {logps.shape} for {self._num_pairs} pairs")
        self.reference_logps = logps


def _chunk_views(batch) -> dict:
    """Zero-copy numpy views of one record batch: (offsets, values) per id
    column, an array per scalar column."""
    views = {}
    for name in _IDS:
        column = batch.column(batch.schema.get_field_index(name))
        views[name] = (column.offsets.to_numpy(zero_copy_only=True), column.values.to_numpy(zero_copy_only=True))
    for name in _SCALARS:
        views[name] = batch.column(batch.schema.get_field_index(name)).to_numpy(zero_copy_only=True)
    return views
