"""Records (one dict per pair) read from the files ``data.*_data_path`` name.

Sources, by what the path is:
  * a directory: a ``datasets.Dataset.save_to_disk`` directory (one split);
  * ``*.parquet``: read with pyarrow (the library ``datasets`` reads it with),
    directly, so that N ranks write no cache files or locks;
  * ``*.json``: a JSON array of objects, or JSON Lines;
  * anything else: JSON Lines, one object per line (blank lines skipped).
Each record comes with ``where``, the place to name in an error:
``file:line`` for JSON Lines, ``file row i`` (from 0) for arrays and tables.
Records are streamed (``iter_records``): a large file is never held whole as
Python objects. Text must be UTF-8; a byte that is not is reported with its
line and byte offset.
"""

import json
import os
from typing import Iterator, List, Tuple

from megatron_dpo.data.errors import DataError

Record = Tuple[str, object]  # (where, the decoded record)
_UTF8_FIX = "save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8), or remove that line"


def read_records(path: str) -> List[Record]:
    """Every record of the file or dataset directory at ``path``; never empty."""
    return list(iter_records(path))


def iter_records(path: str) -> Iterator[Record]:
    """The records of ``path`` one by one; a DataError when there are none."""
    if os.path.isdir(path):
        records = _read_dataset_dir(path)
    elif not os.path.isfile(path):
        raise DataError(
            f"data file {path!r} does not exist; set data.train_data_path / data.val_data_path / "
            "data.val_data_paths to a JSONL, JSON or parquet file or a datasets.save_to_disk directory"
        )
    elif path.endswith(".parquet"):
        records = _read_parquet(path)
    elif path.endswith(".json") and _starts_with_array(path):
        records = _read_json_array(path)
    else:
        records = _read_json_lines(path)
    empty = True
    for record in records:
        empty = False
        yield record
    if empty:
        raise DataError(f"{path} holds no preference pairs; it is empty. Write one record per pair")


def _utf8(data: bytes, path: str, line_no: int, line_offset: int) -> str:
    """``data`` (line ``line_no``, starting at byte ``line_offset`` of the file) as text."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        bad = data[error.start:error.end]
        raise DataError(
            f"{path}:{line_no}: not UTF-8 text: byte {bad!r} at byte offset {line_offset + error.start} of the "
            f"file (column {error.start + 1} of the line); {_UTF8_FIX}"
        ) from None


def _read_json_lines(path: str) -> Iterator[Record]:
    offset = 0
    with open(path, "rb") as handle:
        for line_no, raw in enumerate(handle, start=1):
            line = _utf8(raw, path, line_no, offset)
            offset += len(raw)
            if line.strip():
                yield f"{path}:{line_no}", _decode(line, f"{path}:{line_no}")


def _decode(text: str, where: str) -> object:
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise DataError(f"{where}: not valid JSON ({error}); each line must be one JSON object") from error


def _starts_with_array(path: str) -> bool:
    with open(path, "rb") as handle:
        for raw in handle:
            if raw.strip():
                return raw.lstrip().startswith(b"[")
    return False


def _read_json_array(path: str) -> Iterator[Record]:
    with open(path, "rb") as handle:
        data = handle.read()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        line_start = data.rfind(b"\n", 0, error.start) + 1
        line_end = data.find(b"\n", error.start)
        _utf8(data[line_start:line_end if line_end >= 0 else len(data)], path,
              data.count(b"\n", 0, error.start) + 1, line_start)
        raise  # _utf8 raises: the bad byte is on that line
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as error:
        raise DataError(
            f"{path}:{error.lineno}: not valid JSON ({error}); a .json file holds one array of "
            "objects, or one object per line"
        ) from error
    return ((f"{path} row {index}", row) for index, row in enumerate(rows))


def _read_parquet(path: str) -> Iterator[Record]:
    import pyarrow
    import pyarrow.parquet

    try:
        batches = pyarrow.parquet.ParquetFile(path).iter_batches()
        index = 0
        for batch in batches:
            for row in batch.to_pylist():
                yield f"{path} row {index}", row
                index += 1
    except (pyarrow.ArrowException, OSError) as error:
        raise DataError(f"{path}: not a readable parquet file ({error})") from error


def _read_dataset_dir(path: str) -> Iterator[Record]:
    import datasets

    try:
        dataset = datasets.load_from_disk(path)
    except FileNotFoundError as error:
        raise DataError(
            f"{path} is a directory but not a datasets.save_to_disk directory ({error}); "
            "point the data path at a file or at a directory written by Dataset.save_to_disk"
        ) from error
    if isinstance(dataset, datasets.DatasetDict):
        splits = ", ".join(os.path.join(path, name) for name in dataset)
        raise DataError(
            f"{path} holds a DatasetDict with splits {list(dataset)}; point the data path at "
            f"one split's directory: {splits}"
        )
    return ((f"{path} row {index}", row) for index, row in enumerate(dataset))

