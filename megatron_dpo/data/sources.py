"""Records (one dict per pair) read from the files ``data.*_data_path`` name.

Sources, by what the path is:
  * a directory: a ``datasets.Dataset.save_to_disk`` directory (one split);
  * ``*.parquet``: read with pyarrow (the library ``datasets`` reads it with),
    directly, so that N ranks write no cache files or locks;
  * ``*.json``: a JSON array of objects, or JSON Lines;
  * anything else: JSON Lines, one object per line (blank lines skipped).
Each record comes with ``where``, the place to name in an error:
``file:line`` for JSON Lines, ``file row i`` (from 0) for arrays and tables.
"""

import json
import os
from typing import List, Tuple

from megatron_dpo.data.errors import DataError

Record = Tuple[str, object]  # (where, the decoded record)


def read_records(path: str) -> List[Record]:
    """Every record of the file or dataset directory at ``path``; never empty."""
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
    if not records:
        raise DataError(f"{path} holds no preference pairs; it is empty. Write one record per pair")
    return records


def _read_json_lines(path: str) -> List[Record]:
    records = []
    with open(path, encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, start=1):
            if line.strip():
                records.append((f"{path}:{line_no}", _decode(line, f"{path}:{line_no}")))
    return records


def _decode(text: str, where: str) -> object:
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise DataError(f"{where}: not valid JSON ({error}); each line must be one JSON object") from error


def _starts_with_array(path: str) -> bool:
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                return line.lstrip().startswith("[")
    return False


def _read_json_array(path: str) -> List[Record]:
    with open(path, encoding="utf-8") as handle:
        try:
            rows = json.load(handle)
        except json.JSONDecodeError as error:
            raise DataError(
                f"{path}:{error.lineno}: not valid JSON ({error}); a .json file holds one array of "
                "objects, or one object per line"
            ) from error
    return [(f"{path} row {index}", row) for index, row in enumerate(rows)]


def _read_parquet(path: str) -> List[Record]:
    import pyarrow
    import pyarrow.parquet

    try:
        rows = pyarrow.parquet.read_table(path).to_pylist()
    except (pyarrow.ArrowException, OSError) as error:
        raise DataError(f"{path}: not a readable parquet file ({error})") from error
    return [(f"{path} row {index}", row) for index, row in enumerate(rows)]


def _read_dataset_dir(path: str) -> List[Record]:
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
    return [(f"{path} row {index}", row) for index, row in enumerate(dataset)]
