"""Table inputs: parquet files and Hugging Face `datasets` folders (save_to_disk), read with pyarrow.

A record is a row; `--json-keys` name string columns. A parquet file is read one row group at a time (what a
work unit holds); a `datasets` folder's Arrow files are memory-mapped, as `datasets.load_from_disk` does, and
cut into row ranges of about `chunk_bytes`. Rows are numbered from 0 in the file (parquet) or across the
folder's Arrow files (a `datasets` folder: row i is `load_from_disk(folder)[i]`).

A file pyarrow cannot read, an unknown column or a column that does not hold strings is a DataError naming
the file (one line); a null or blank value is a bad row, skipped and reported like a bad jsonl line.
"""
import json
import os
from typing import Iterator, List, Optional, Sequence, Tuple

from megaloop.data.indexed_dataset import DataError
from megaloop.data.text_inputs import require

HF_STATE = "state.json"  # written by Dataset.save_to_disk next to its data-*.arrow files
HF_DICT = "dataset_dict.json"  # written by DatasetDict.save_to_disk above one folder per split


def is_hf_dataset_folder(path: str) -> bool:
    return os.path.isdir(path) and (os.path.isfile(os.path.join(path, HF_STATE))
                                    or os.path.isfile(os.path.join(path, HF_DICT)))


def hf_arrow_files(folder: str) -> List[str]:
    """The Arrow files of a saved Dataset, in its row order (state.json's _data_files)."""
    if os.path.isfile(os.path.join(folder, HF_DICT)):
        splits = sorted(d for d in os.listdir(folder) if os.path.isfile(os.path.join(folder, d, HF_STATE)))
        example = os.path.join(folder, splits[0]) if splits else os.path.join(folder, "train")
        raise DataError(f"{folder}: a DatasetDict with splits {', '.join(splits) or '(none)'}; pass one split's "
                        f"folder, e.g. --input {example}")
    try:
        with open(os.path.join(folder, HF_STATE), encoding="utf-8") as f:
            names = [entry["filename"] for entry in json.load(f)["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"{folder}: unreadable {HF_STATE} ({e}); save the dataset again with "
                        f"Dataset.save_to_disk") from None
    files = [os.path.join(folder, name) for name in names]
    missing = [f for f in files if not os.path.isfile(f)]
    if missing:
        raise DataError(f"{folder}: {HF_STATE} lists {missing[0]}, which is missing; copy the whole folder again")
    return files


def input_bytes(path: str, fmt: str) -> int:
    """Bytes on disk, for the progress bar."""
    if fmt == "arrow":
        return sum(os.path.getsize(f) for f in hf_arrow_files(path))
    return os.path.getsize(path)


def _unreadable(path: str, what: str, e: Exception) -> DataError:
    detail = " ".join(str(e).split())[:200]
    return DataError(f"{path}: corrupt or not {what} ({detail}); re-download or re-write it, or leave it out "
                     f"of --input")


# Each worker process keeps the last opened file: consecutive units of one file reuse it.
_open_cache: dict = {}


def _parquet_file(path: str):
    pa, pq = require("pyarrow", path), require("pyarrow.parquet", path)

    if _open_cache.get("parquet", (None,))[0] != path:
        if os.path.getsize(path) == 0:
            raise DataError(f"{path}: empty file (0 bytes), not a parquet file; leave it out of --input")
        try:
            _open_cache["parquet"] = (path, pq.ParquetFile(path, memory_map=True))
        except (OSError, pa.ArrowException) as e:
            raise _unreadable(path, "a parquet file", e) from None
    return _open_cache["parquet"][1]


def _arrow_table(path: str):
    """A saved Dataset's Arrow file (IPC stream format), memory-mapped: slicing it copies nothing."""
    pa = require("pyarrow", path)

    if _open_cache.get("arrow", (None,))[0] != path:
        try:
            _open_cache["arrow"] = (path, pa.ipc.open_stream(pa.memory_map(path)).read_all())
        except (OSError, pa.ArrowException) as e:
            raise _unreadable(path, "an Arrow stream file (Dataset.save_to_disk)", e) from None
    return _open_cache["arrow"][1]


def check_columns(path: str, fmt: str, keys: Sequence[str]) -> None:
    """Refuse, naming the file, a table that cannot be read or lacks a string column per key."""
    pa = require("pyarrow", path)

    if fmt == "parquet":
        schema = _parquet_file(path).schema_arrow
    else:
        files = hf_arrow_files(path)
        if not files:
            raise DataError(f"{path}: the saved dataset has no Arrow files; save it again with Dataset.save_to_disk")
        schema = _arrow_table(files[0]).schema
    for key in keys:
        if key not in schema.names:
            raise DataError(f"{path}: no column {key!r} (--json-keys); its columns are "
                            f"{', '.join(schema.names) or '(none)'}")
        kind = schema.field(key).type
        string_view = getattr(pa.types, "is_string_view", lambda _: False)  # pyarrow >= 16
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or string_view(kind)):
            raise DataError(f"{path}: column {key!r} holds {kind}, not strings; name a text column with --json-keys")


def table_units(path: str, fmt: str, chunk_bytes: int) -> Iterator[Tuple[str, int, int, int, int]]:
    """(file, part, row_start, row_end, approximate input bytes) per work unit, in row order.

    parquet: one unit per row group (part = its index). A datasets folder: row ranges of about chunk_bytes of
    Arrow data within each Arrow file (part unused), cut at its record batches."""
    if fmt == "parquet":
        meta = _parquet_file(path).metadata
        size, rows = os.path.getsize(path), max(meta.num_rows, 1)
        start = 0
        for group in range(meta.num_row_groups):
            n = meta.row_group(group).num_rows
            yield path, group, start, start + n, size * n // rows
            start += n
        return
    for file in hf_arrow_files(path):
        table, size = _arrow_table(file), os.path.getsize(file)
        start = end = acc = 0
        for batch in table.to_batches():
            end += batch.num_rows
            acc += batch.nbytes
            if acc >= chunk_bytes:
                yield file, 0, start, end, size * (end - start) // max(table.num_rows, 1)
                start, acc = end, 0
        if end > start:
            yield file, 0, start, end, size * (end - start) // max(table.num_rows, 1)


def read_rows(path: str, fmt: str, file: str, part: int, start: int, end: int,
              keys: Sequence[str]) -> List[Tuple[Optional[str], ...]]:
    """The values of `keys` in each row of one unit (None for a null)."""
    pa = require("pyarrow", path)

    try:
        if fmt == "parquet":
            table = _parquet_file(file).read_row_group(part, columns=list(keys))
        else:
            table = _arrow_table(file).slice(start, end - start).select(list(keys))
        columns = [table.column(key).to_pylist() for key in keys]
    except (OSError, pa.ArrowException) as e:
        where = f"row group {part}" if fmt == "parquet" else f"rows {start}-{end - 1} of {os.path.basename(file)}"
        raise _unreadable(path, "a parquet file" if fmt == "parquet" else "a saved dataset",
                          RuntimeError(f"{where}: {e}")) from None
    return list(zip(*columns))


def iter_table_rows(path: str, fmt: str, keys: Sequence[str],
                    chunk_bytes: int = 1 << 24) -> Iterator[Tuple[int, Tuple[Optional[str], ...]]]:
    """(row number from 0, values) of every row, one unit in memory at a time."""
    check_columns(path, fmt, keys)
    row = 0
    for file, part, start, end, _ in table_units(path, fmt, chunk_bytes):
        for values in read_rows(path, fmt, file, part, start, end, keys):
            yield row, values
            row += 1
