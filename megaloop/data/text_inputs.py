"""Where raw documents come from: input globs, jsonl / text files (optionally gzip), and record checks.

A record is one line. In a jsonl file it is a JSON object whose `keys` hold strings; in a text file the
whole line is the document for the single key. parse_record either returns the document texts or raises
BadRecord with a reason fit for a report ("malformed json: ...", "missing key 'text'", ...).
"""
import contextlib
import glob
import gzip
import json
import os
import zlib
from collections import Counter
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

from megaloop.data.indexed_dataset import DataError

JSONL_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz")
TEXT_SUFFIXES = (".txt", ".txt.gz")


class BadRecord(DataError):
    """A record that cannot become a document: category groups the report, detail adds specifics."""

    def __init__(self, category: str, detail: str = ""):
        super().__init__(f"{category}: {detail}" if detail else category)
        self.category = category
        self.detail = detail


def expand_inputs(patterns: Sequence[str]) -> List[str]:
    """Expand globs (and comma-separated lists, as Megatron users write them) into a list of files.

    Order is the order of the patterns, then sorted within a pattern, so outputs are reproducible.
    """
    files: List[str] = []
    for pattern in patterns:
        for part in pattern.split(","):
            part = part.strip()
            if not part:
                continue
            matches = sorted(p for p in glob.glob(part, recursive=True) if os.path.isfile(p))
            if not matches:
                raise InputNotFoundError(f"--input {part!r} matches no file: check the path or glob (quote globs "
                                         f"so the tool expands them)")
            for path in matches:
                input_format(path)  # fail early on an extension we cannot read
                if path not in files:
                    files.append(path)
    return files


def input_format(path: str) -> str:
    """'jsonl' or 'text', from the file name."""
    if path.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if path.endswith(TEXT_SUFFIXES):
        return "text"
    raise DataError(f"{path}: unknown input type; name it with one of {', '.join(JSONL_SUFFIXES + TEXT_SUFFIXES)}")


def is_gzip(path: str) -> bool:
    return path.endswith(".gz")


def open_binary(path: str):
    return gzip.open(path, "rb") if is_gzip(path) else open(path, "rb")


class InputNotFoundError(DataError, FileNotFoundError):
    """An --input path or glob that matches no file (still a FileNotFoundError)."""


@contextlib.contextmanager
def reading(path: str):
    """Turn a truncated or corrupt gzip stream of `path` into a one-line DataError naming the file."""
    try:
        yield
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise DataError(f"{path}: truncated or corrupt gzip file ({e}): re-download or re-compress it, or leave "
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


def is_blank(line: bytes) -> bool:
    return not line.strip()


def iter_documents(paths: Sequence[str], keys: Sequence[str],
                   skipped: Optional[SkipCounter] = None) -> Iterator[str]:
    """Every valid document text (all keys), skipping bad records (counted in `skipped`, with file:line);
    for tokenizer training. A truncated gzip input raises DataError naming it."""
    for path in paths:
        fmt = input_format(path)
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
