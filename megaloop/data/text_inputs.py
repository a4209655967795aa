"""Where raw documents come from: input globs, jsonl / text files (optionally gzip), and record checks.

A record is one line. In a jsonl file it is a JSON object whose `keys` hold strings; in a text file the
whole line is the document for the single key. parse_record either returns the document texts or raises
BadRecord with a reason fit for a report ("malformed json: ...", "missing key 'text'", ...).
"""
import glob
import gzip
import json
import os
from typing import Iterator, List, Sequence, Tuple

JSONL_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz")
TEXT_SUFFIXES = (".txt", ".txt.gz")


class BadRecord(ValueError):
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
                raise FileNotFoundError(f"--input {part!r} matches no file")
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
    raise ValueError(f"{path}: unknown input type; expected one of {JSONL_SUFFIXES + TEXT_SUFFIXES}")


def is_gzip(path: str) -> bool:
    return path.endswith(".gz")


def open_binary(path: str):
    return gzip.open(path, "rb") if is_gzip(path) else open(path, "rb")


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


def iter_documents(paths: Sequence[str], keys: Sequence[str]) -> Iterator[str]:
    """Every valid document text (all keys), skipping bad records; for tokenizer training."""
    for path in paths:
        fmt = input_format(path)
        with open_binary(path) as f:
            for line in f:
                if fmt == "jsonl" and is_blank(line):
                    continue
                try:
                    yield from parse_record(line, fmt, keys if fmt == "jsonl" else keys[:1])
                except BadRecord:
                    continue
