"""Work units of preprocessing: how the main process cuts the inputs, and how a worker reads and parses one.

  * a plain line file: a byte range ending on a newline (the worker reads the range itself, so no text is
    pickled);
  * a gzip or zstandard line file: a block of decompressed lines (a stream cannot be entered in the middle);
  * `text_documents="file"`: a whole text file;
  * a parquet file: one row group (the worker reads it; only the file name and the group's index travel);
  * a Hugging Face `datasets` folder: a row range of one of its memory-mapped Arrow files.

Memory in flight is a few units: about chunk_bytes each, or one parquet row group. Record numbers in a unit
start at 1 (lines, or rows) and the main process adds the records of the file's earlier units.
"""
import dataclasses
import os
from typing import Iterator, List, Optional, Sequence, Tuple

from megaloop.data.table_inputs import check_columns, read_rows, table_units
from megaloop.data.text_inputs import (LINE_FORMATS, BadRecord, input_format, is_blank, is_compressed, open_binary,
                                       parse_record, parse_row, reading)


@dataclasses.dataclass
class WorkUnit:
    path: str  # the input as given (a datasets folder for its Arrow files)
    fmt: str  # "jsonl" | "text" | "text-file" | "parquet" | "arrow"
    start: int = 0  # byte range of a plain file; row range of a table
    end: int = 0
    data: Optional[bytes] = None  # decompressed lines of a gzip / zstandard file
    file: str = ""  # tables: the file holding the rows
    part: int = 0  # parquet: the row group
    nbytes: int = 0  # tables: approximate bytes on disk (progress)


def _plain_file_units(path: str, fmt: str, chunk_bytes: int) -> Iterator[WorkUnit]:
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        start = 0
        while start < size:
            f.seek(min(start + chunk_bytes, size))
            f.readline()  # move the cut to just after the next newline, so no line is split
            end = min(f.tell(), size)
            yield WorkUnit(path, fmt, start, end)
            start = end


def _stream_file_units(path: str, fmt: str, chunk_bytes: int) -> Iterator[WorkUnit]:
    with reading(path), open_binary(path) as f:
        carry = b""
        while True:
            block = f.read(chunk_bytes)
            if not block:
                break
            block = carry + block
            cut = block.rfind(b"\n") + 1
            if cut == 0:  # one line longer than the block: keep reading
                carry = block
                continue
            carry = block[cut:]
            yield WorkUnit(path, fmt, data=block[:cut])
        if carry:
            yield WorkUnit(path, fmt, data=carry)


def check_inputs(paths: Sequence[str], keys: Sequence[str]) -> None:
    """Up-front checks that need no tokenizer: every table can be opened and has a string column per key."""
    for path in paths:
        fmt = input_format(path)
        if fmt not in LINE_FORMATS:
            check_columns(path, fmt, keys)


def iter_work_units(paths: Sequence[str], text_documents: str, chunk_bytes: int) -> Iterator[WorkUnit]:
    for path in paths:
        fmt = input_format(path)
        if fmt not in LINE_FORMATS:
            for file, part, start, end, nbytes in table_units(path, fmt, chunk_bytes):
                yield WorkUnit(path, fmt, start, end, file=file, part=part, nbytes=nbytes)
        elif fmt == "text" and text_documents == "file":
            yield WorkUnit(path, "text-file")
        elif is_compressed(path):
            yield from _stream_file_units(path, fmt, chunk_bytes)
        else:
            yield from _plain_file_units(path, fmt, chunk_bytes)


def _read_unit(unit: WorkUnit) -> bytes:
    if unit.data is not None:
        return unit.data
    if unit.fmt == "text-file":
        with reading(unit.path), open_binary(unit.path) as f:  # compressed or plain
            return f.read()
    with open(unit.path, "rb") as f:
        f.seek(unit.start)
        return f.read(unit.end - unit.start)


@dataclasses.dataclass
class ParsedUnit:
    num_records: int  # lines or rows, blank ones included
    texts: List[Tuple[str, ...]]  # per document: one text per key
    record_numbers: List[int]  # per document: 1-based line / row within the unit, 0 for a whole file
    skipped: List[Tuple[int, str, str]]  # (record number, category, detail)
    blank_lines: int
    input_bytes: int


def parse_unit(unit: WorkUnit, keys: List[str]) -> ParsedUnit:
    texts: List[Tuple[str, ...]] = []
    numbers: List[int] = []
    skipped: List[Tuple[int, str, str]] = []
    if unit.fmt not in LINE_FORMATS + ("text-file",):
        rows = read_rows(unit.path, unit.fmt, unit.file, unit.part, unit.start, unit.end, keys)
        for row_no, values in enumerate(rows, start=1):
            try:
                texts.append(parse_row(values, keys))
                numbers.append(row_no)
            except BadRecord as e:
                skipped.append((row_no, e.category, e.detail))
        return ParsedUnit(len(rows), texts, numbers, skipped, 0, unit.nbytes)
    data = _read_unit(unit)
    if unit.fmt == "text-file":
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            skipped.append((0, "invalid UTF-8", f"byte {e.start} of the file"))
        else:
            if text.strip():
                texts.append((text,))
                numbers.append(0)
            else:
                skipped.append((0, "empty document", ""))
        return ParsedUnit(1, texts, numbers, skipped, 0, len(data))
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()  # the nothing after the final newline
    blank = 0
    for line_no, line in enumerate(lines, start=1):
        if is_blank(line):
            blank += 1
            continue
        try:
            texts.append(parse_record(line, unit.fmt, keys))
            numbers.append(line_no)
        except BadRecord as e:
            skipped.append((line_no, e.category, e.detail))
    return ParsedUnit(len(lines), texts, numbers, skipped, blank, len(data))
