"""Where raw documents come from: input globs and folders, line files (jsonl / text, plain, gzip or zstandard)
and tables (parquet, a Hugging Face `datasets` folder), and record checks.

A record of a line file is one line. In a jsonl file it is a JSON object whose `keys` hold strings; in a text
file the whole line is the document for the single key. A record of a table is one row, whose `keys` name
string columns (megaloop/data/table_inputs.py). parse_record / parse_row either return the document texts or
raise BadRecord with a reason fit for a report ("malformed json: ...", "missing key 'text'", ...).
"""
import contextlib
import glob
import gzip
import io
import json
import os
import zlib
from collections import Counter
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

from megaloop.data.indexed_dataset import DataError

COMPRESSIONS = ("", ".gz", ".zst")
JSONL_SUFFIXES = tuple(base + c for base in (".jsonl", ".json") for c in COMPRESSIONS)
TEXT_SUFFIXES = tuple(".txt" + c for c in COMPRESSIONS)
TABLE_SUFFIXES = (".parquet",)
HF_DATASET_FOLDER = "a Hugging Face datasets folder (save_to_disk)"
LINE_FORMATS = ("jsonl", "text")  # records are lines; "parquet" and "arrow" records are table rows


class BadRecord(DataError):
    """A record that cannot become a document: category groups the report, detail adds specifics."""

    def __init__(self, category: str, detail: str = ""):
        super().__init__(f"{category}: {detail}" if detail else category)
        self.category = category
        self.detail = detail


def expand_inputs(patterns: Sequence[str]) -> List[str]:
    """Expand globs, folders (and comma-separated lists, as Megatron users write them) into a list of inputs.

    Order is the order of the patterns, then sorted within a pattern, so outputs are reproducible. A folder
    saved by `datasets.Dataset.save_to_disk` is one input; any other folder stands for the readable files
    under it (recursively; other files, such as a README, are left out).
    """
    from megaloop.data.table_inputs import hf_arrow_files, is_hf_dataset_folder

    inputs: List[str] = []
    for pattern in patterns:
        for part in pattern.split(","):
            part = part.strip()
            if not part:
                continue
            matches = sorted(p for p in glob.glob(part, recursive=True) if os.path.exists(p))
            found = []
            for path in matches:
                if os.path.isfile(path) or is_hf_dataset_folder(path):
                    found.append(path)
                elif not glob.has_magic(part):  # a folder named as such; a glob's folders are left out
                    found.extend(_files_in_folder(path))
            if not found and not matches:
                raise InputNotFoundError(f"--input {part!r} matches no file: check the path or glob (quote globs "
                                         f"so the tool expands them)")
            if not found:
                raise InputNotFoundError(f"--input {part!r}: no readable file in that folder (names ending in "
                                         f"{', '.join(JSONL_SUFFIXES + TEXT_SUFFIXES + TABLE_SUFFIXES)}, or "
                                         f"{HF_DATASET_FOLDER})")
            for path in found:
                if input_format(path) == "arrow":  # fail early on an extension we cannot read
                    hf_arrow_files(path)  # and on a DatasetDict or a folder with files missing
                if path not in inputs:
                    inputs.append(path)
    return inputs


def _files_in_folder(folder: str) -> List[str]:
    from megaloop.data.table_inputs import is_hf_dataset_folder

    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames.sort()
        saved = [d for d in dirnames if is_hf_dataset_folder(os.path.join(dirpath, d))]
        found.extend(os.path.join(dirpath, d) for d in saved)
        dirnames[:] = [d for d in dirnames if d not in saved and not d.startswith(".")]
        found.extend(os.path.join(dirpath, f) for f in sorted(filenames) if f.endswith(
            JSONL_SUFFIXES + TEXT_SUFFIXES + TABLE_SUFFIXES))
    return sorted(found)


def input_format(path: str) -> str:
    """'jsonl', 'text', 'parquet' or 'arrow' (a `datasets` folder), from the name."""
    if path.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if path.endswith(TEXT_SUFFIXES):
        return "text"
    if path.endswith(TABLE_SUFFIXES):
        return "parquet"
    if os.path.isdir(path):
        from megaloop.data.table_inputs import is_hf_dataset_folder

        if is_hf_dataset_folder(path):
            return "arrow"
    raise DataError(f"{path}: unknown input type; name it with one of "
                    f"{', '.join(JSONL_SUFFIXES + TEXT_SUFFIXES + TABLE_SUFFIXES)}, or give {HF_DATASET_FOLDER}")


def compression(path: str) -> str:
    """'gzip', 'zstd' or '' (plain), from the file name."""
    return {".gz": "gzip", ".zst": "zstd"}.get(os.path.splitext(path)[1], "")


def is_compressed(path: str) -> bool:
    return compression(path) != ""


class TruncatedZstd(EOFError):
    """The zstandard stream ended inside a frame."""


class ZstdStream(io.RawIOBase):
    """A streamed zstandard file, frame after frame (pzstd and concatenated .zst files hold several).

    zstandard's stream_reader returns a clean end of file for a truncated stream, so frames are decoded with
    decompressobj here and a stream that ends inside a frame raises TruncatedZstd. Memory: one read block.
    """

    def __init__(self, path: str, read_size: int = 1 << 20):
        zstandard = require("zstandard", path)
        self._file = open(path, "rb")
        # Files written with --long (up to 2 GiB windows) decode too.
        self._dctx = zstandard.ZstdDecompressor(max_window_size=1 << 31)
        self._obj = self._dctx.decompressobj()
        self._in_frame = False  # input fed since the last frame ended
        self._pending = b""
        self._read_size = read_size

    def readable(self):
        return True

    def _fill(self) -> bool:
        while not self._pending:
            data = self._file.read(self._read_size)
            if not data:
                if self._in_frame:
                    raise TruncatedZstd("the stream ends inside a frame")
                return False
            while data:
                self._in_frame = True
                self._pending += self._obj.decompress(data)
                if not self._obj.eof:
                    break
                data, self._in_frame = self._obj.unused_data, False
                self._obj = self._dctx.decompressobj()
        return True

    def readinto(self, buffer) -> int:
        if not self._fill():
            return 0
        n = min(len(buffer), len(self._pending))
        buffer[:n] = self._pending[:n]
        self._pending = self._pending[n:]
        return n

    def close(self):
        self._file.close()
        super().close()


def open_binary(path: str):
    """A binary line file, decompressed as a stream."""
    kind = compression(path)
    if kind == "gzip":
        return gzip.open(path, "rb")
    if kind == "zstd":
        return io.BufferedReader(ZstdStream(path), buffer_size=1 << 20)
    return open(path, "rb")


class InputNotFoundError(DataError, FileNotFoundError):
    """An --input path or glob that matches no file (still a FileNotFoundError)."""


def require(module: str, path: str):
    """An optional reader library (setup.py's `data` extra), or a one-line error naming the input."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise DataError(f"{path}: reading it needs the {module} package: pip install {module} (or megaloop's "
                        f"'data' extra: pip install -e '.[data]')") from None


def _stream_errors() -> tuple:
    errors = (EOFError, gzip.BadGzipFile, zlib.error)
    try:
        import zstandard
    except ImportError:
        return errors
    return errors + (zstandard.ZstdError,)


@contextlib.contextmanager
def reading(path: str):
    """Turn a truncated or corrupt gzip / zstandard stream of `path` into a one-line DataError naming the file."""
    try:
        yield
    except _stream_errors() as e:
        kind = "zstandard" if compression(path) == "zstd" else "gzip"
        raise DataError(f"{path}: truncated or corrupt {kind} file ({e}): re-download or re-compress it, or leave "
                        f"it out of --input") from None


class SkipCounter:
    """Skipped records by reason, with the first few places of each: what a report of 'nothing usable' says."""

    def __init__(self, examples: int = 3):
        self.counts: Counter = Counter()
        self.examples: Dict[str, List[str]] = {}
        self.max_examples = examples

    def add(self, reason: str, where: str) -> None:
        self.counts[reason] += 1
        places = self.examples.setdefault(reason, [])
        if len(places) < self.max_examples:
            places.append(where)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self, reasons: int = 3) -> str:
        """'2 x missing key 'text' (a.jsonl:1, a.jsonl:2), 1 x malformed json (a.jsonl:3)'."""
        parts = [f"{n:,} x {reason} ({', '.join(self.examples.get(reason, []))})"
                 for reason, n in self.counts.most_common(reasons)]
        more = len(self.counts) - reasons
        return "; ".join(parts) + (f"; and {more} more reasons" if more > 0 else "")


def parse_record(line: bytes, fmt: str, keys: Sequence[str]) -> Tuple[str, ...]:
    """The document text for each key, or BadRecord."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadRecord("invalid UTF-8", f"byte {e.start} of the line") from None
    if fmt == "text":
        text = text.rstrip("\r\n")
        if not text.strip():
            raise BadRecord("empty document")
        return (text,)
    try:
        record = json.loads(text)
    except json.JSONDecodeError as e:
        raise BadRecord("malformed json", f"{e.msg} at column {e.colno}") from None
    if not isinstance(record, dict):
        raise BadRecord("json value is not an object", f"found a {type(record).__name__}")
    texts = []
    for key in keys:
        if key not in record:
            raise BadRecord(f"missing key {key!r}")
        value = record[key]
        if not isinstance(value, str):
            raise BadRecord(f"key {key!r} is not a string", f"found a {type(value).__name__}")
        if not value.strip():
            raise BadRecord(f"empty document under key {key!r}")
        texts.append(value)
    return tuple(texts)


def parse_row(values: Sequence[Optional[str]], keys: Sequence[str]) -> Tuple[str, ...]:
    """A table row's texts (column types were checked up front), or BadRecord."""
    for key, value in zip(keys, values):
        if value is None:
            raise BadRecord(f"null value under key {key!r}")
        if not value.strip():
            raise BadRecord(f"empty document under key {key!r}")
    return tuple(values)


def is_blank(line: bytes) -> bool:
    return not line.strip()


def record_place(path: str, number: int) -> str:
    """'a.jsonl:3' for line 3 of a line file; 'b.parquet row 2' for a table's row 2 (from 0, as ds[2])."""
    return f"{path}:{number}" if input_format(path) in LINE_FORMATS else f"{path} row {number - 1}"


def iter_documents(paths: Sequence[str], keys: Sequence[str],
                   skipped: Optional[SkipCounter] = None) -> Iterator[str]:
    """Every valid document text (all keys), skipping bad records (counted in `skipped`, with file:line or file
    row); for tokenizer training. A truncated or corrupt input raises DataError naming it."""
    from megaloop.data.table_inputs import iter_table_rows

    for path in paths:
        fmt = input_format(path)
        if fmt not in LINE_FORMATS:
            for row, values in iter_table_rows(path, fmt, keys):
                try:
                    yield from parse_row(values, keys)
                except BadRecord as e:
                    if skipped is not None:
                        skipped.add(e.category, record_place(path, row + 1))
            continue
        with reading(path), open_binary(path) as f:
            for line_no, line in enumerate(f, start=1):
                if is_blank(line):
                    if fmt == "text" and skipped is not None:
                        skipped.add("empty document", f"{path}:{line_no}")
                    continue
                try:
                    texts = parse_record(line, fmt, keys if fmt == "jsonl" else keys[:1])
                except BadRecord as e:
                    if skipped is not None:
                        skipped.add(e.category, f"{path}:{line_no}")
                    continue
                yield from texts
