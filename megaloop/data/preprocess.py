"""Raw text -> Megatron-compatible .bin/.idx, tokenized by a pool of worker processes.

How the work is split, and why it is fast:
  * The main process only cuts the input into work units (megaloop/data/work_units.py): a byte range of
    about `chunk_bytes` ending on a newline of a plain file (the worker reads the range itself, so no text
    is pickled), a block of decompressed lines of a gzip / zstandard file, a parquet row group, a row range
    of a `datasets` folder's memory-mapped Arrow file, or a whole file for `text_documents="file"`.
  * Each worker parses its records, encodes all documents of the unit with one batched tokenizer call
    (a byte-level BPE tokenizer.json: megaloop/data/piece_cache.py, the same ids ~5x cheaper than
    Megatron-LM's transformers call per document), and returns flat numpy arrays (tokens, lengths) in the
    output dtype: a few bytes per token.
  * Pool.imap keeps the units in input order, so the output order is the input order for any
    number of workers, and the main process appends each unit to the writers as it arrives.

Bad records (malformed json, missing key, non-string value, invalid UTF-8, empty document) are
skipped, counted and reported with file and line; with strict=True the first one is an error. Output
goes to temporary names and is renamed into place only after the last unit, so an interrupted or
failed run leaves no file that looks valid. Next to each .bin/.idx, {prefix}.tokenizer.json records the
tokenizer (type, vocabulary size, sha256 of its model file; megaloop/data/dataset_tokenizer.py), so that
training and evaluation refuse a model with another tokenizer; Megatron-LM ignores the file.
"""
import dataclasses
import itertools
import multiprocessing
import os
import resource
import signal
import sys
import threading
import time
from collections import Counter, defaultdict
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from megaloop.data.dataset_tokenizer import sidecar_path, write_sidecar
from megaloop.data.indexed_dataset import DataError, IndexedDatasetWriter, token_dtype_for_vocab
from megaloop.data.shuffle_documents import first_pass_prefix, remove_dataset, shuffle_pass
from megaloop.data.table_inputs import input_bytes
from megaloop.data.text_inputs import input_format, record_place
from megaloop.data.work_units import WorkUnit, check_inputs, iter_work_units, parse_unit
from megaloop.errors import OutputError
from megaloop.data.tokenizer import Tokenizer, build_tokenizer


@dataclasses.dataclass
class PreprocessConfig:
    input_files: List[str]
    output_prefix: str
    tokenizer_type: str = "byte"
    tokenizer_model: Optional[str] = None
    tokenizer_eod: Optional[str] = None  # hf / tiktoken: the end-of-document token, when the tokenizer names none
    json_keys: Sequence[str] = ("text",)
    append_eod: bool = False
    workers: int = 1
    strict: bool = False
    text_documents: str = "line"  # .txt inputs: one document per "line" or per "file"
    chunk_bytes: int = 1 << 20  # work unit size: small enough to balance workers, large enough to batch
    log_interval: int = 10000  # documents between progress lines when stderr is not a terminal
    report_examples: int = 5  # file:line examples printed per kind of skipped record
    show_progress: bool = True
    shuffle_seed: Optional[int] = None  # None: input order; else a seeded document order (shuffle_documents.py)


class PreprocessError(DataError):
    """A bad record under strict=True, or an input that yields no document at all."""


@dataclasses.dataclass
class SkippedRecord:
    path: str
    line: int  # 1-based line or row (printed from 0 for rows); 0 when the whole file is the record
    category: str
    detail: str

    def where(self) -> str:
        return record_place(self.path, self.line) if self.line else self.path

    def __str__(self):
        return f"{self.where()}: {self.category}" + (f" ({self.detail})" if self.detail else "")


@dataclasses.dataclass
class PreprocessSummary:
    output_paths: Dict[str, str]  # json key -> dataset path prefix
    documents: int = 0
    tokens: Dict[str, int] = dataclasses.field(default_factory=dict)  # per json key
    blank_lines: int = 0
    skipped: Counter = dataclasses.field(default_factory=Counter)  # category -> count
    skipped_examples: Dict[str, List[SkippedRecord]] = dataclasses.field(default_factory=lambda: defaultdict(list))
    seconds: float = 0.0
    main_process_cpu_seconds: float = 0.0  # reading, dispatching, writing: small, so workers set the pace
    worker_cpu_seconds: float = 0.0
    shuffle_seed: Optional[int] = None

    @property
    def total_tokens(self) -> int:
        return sum(self.tokens.values())

    @property
    def total_skipped(self) -> int:
        return sum(self.skipped.values())

    def report(self) -> str:
        rate = self.total_tokens / max(self.seconds, 1e-9)
        lines = [f"done in {self.seconds:.1f}s: {self.documents:,} documents, {self.total_tokens:,} tokens "
                 f"({rate / 1e6:.2f} M tokens/s, {self.documents / max(self.seconds, 1e-9):,.0f} docs/s); CPU "
                 f"seconds: {self.worker_cpu_seconds:.1f} in workers, {self.main_process_cpu_seconds:.1f} in the "
                 f"main process"]
        for key, prefix in self.output_paths.items():
            lines.append(f"  {key!r}: {self.tokens.get(key, 0):,} tokens -> {prefix}.bin/.idx (+ .tokenizer.json)")
        if self.shuffle_seed is not None:
            lines.append(f"documents shuffled with seed {self.shuffle_seed} (input order otherwise)")
        if self.total_skipped:
            lines.append(f"skipped {self.total_skipped:,} records:")
            for category, count in self.skipped.most_common():
                lines.append(f"  {count:,} x {category}")
                for example in self.skipped_examples[category]:
                    lines.append(f"      {example}")
        else:
            lines.append("skipped 0 records")
        if self.blank_lines:
            lines.append(f"ignored {self.blank_lines:,} blank lines")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Worker side
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class UnitResult:
    path: str
    num_lines: int
    num_documents: int
    tokens: List[np.ndarray]  # per json key: all documents of the unit, concatenated
    lengths: List[np.ndarray]  # per json key: tokens per document
    skipped: List[Tuple[int, str, str]]  # (1-based line within the unit or 0 for a whole file, category, detail)
    blank_lines: int
    input_bytes: int
    cpu_seconds: float


_worker = {}  # per-process state set by _init_worker: the tokenizer is loaded once per process


def _init_worker(tokenizer_type, tokenizer_model, json_keys, append_eod, dtype, tokenizer_eod=None):
    # One thread per worker, as sentencepiece's num_threads=1: --workers is the parallelism (Hugging Face
    # tokenizers would otherwise start a thread per core in every worker).
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    # A forked worker inherits the caller's SIGTERM handler (a trainer's clean-stop flag, a test runner's):
    # then Pool.terminate()'s SIGTERM does not end it, and a worker blocked on the task queue's lock (whose
    # holder the same terminate killed) is joined forever. Workers die on SIGTERM.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    tokenizer = build_tokenizer(tokenizer_type, tokenizer_model, eod_token=tokenizer_eod)
    _worker.update(tokenizer=tokenizer, json_keys=list(json_keys), append_eod=append_eod, dtype=np.dtype(dtype))


def _encode_flat(tokenizer: Tokenizer, texts: List[str], dtype: np.dtype) -> Tuple[np.ndarray, np.ndarray]:
    """All documents' ids as one array of dtype, plus the ids per document."""
    flat = getattr(tokenizer, "encode_batch_flat", None)  # hf byte-level BPE: already flat (piece_cache.py)
    encoded = flat(texts) if flat is not None else None
    if encoded is not None:
        flat, lengths = encoded
    else:
        encoded = tokenizer.encode_batch(texts)
        lengths = np.fromiter((len(ids) for ids in encoded), dtype=np.int64, count=len(encoded))
        total = int(lengths.sum())
        if encoded and isinstance(encoded[0], np.ndarray):
            flat = np.concatenate(encoded) if total else np.zeros(0, dtype=np.int64)
        else:
            flat = np.fromiter(itertools.chain.from_iterable(encoded), dtype=np.int64, count=total)
    if flat.size and (flat.min() < 0 or flat.max() > np.iinfo(dtype).max):
        raise ValueError(f"tokenizer produced ids outside {dtype}'s range")  # never wrap ids silently
    return flat.astype(dtype), lengths


def tokenize_unit(unit: WorkUnit) -> UnitResult:
    cpu_start = time.process_time()
    tokenizer: Tokenizer = _worker["tokenizer"]
    keys: List[str] = _worker["json_keys"]
    parsed = parse_unit(unit, keys)
    texts, line_numbers, skipped = parsed.texts, parsed.record_numbers, parsed.skipped
    per_key = [_encode_flat(tokenizer, [t[k] for t in texts], _worker["dtype"]) for k in range(len(keys))]
    # A document that tokenizes to nothing is an empty document: drop it from every key, so the
    # datasets of all keys stay aligned document for document.
    empty = np.zeros(len(texts), dtype=bool)
    for _, lengths in per_key:
        empty |= lengths == 0
    if empty.any():
        for i in np.flatnonzero(empty):
            skipped.append((line_numbers[i], "empty document", "no tokens after tokenization"))
        skipped.sort()
        per_key = [_drop_documents(tokens, lengths, ~empty) for tokens, lengths in per_key]
    if _worker["append_eod"]:
        per_key = [_append_eod(tokens, lengths, tokenizer.eod_id) for tokens, lengths in per_key]
    return UnitResult(
        path=unit.path,
        num_lines=parsed.num_records,
        num_documents=int((~empty).sum()),
        tokens=[tokens for tokens, _ in per_key],
        lengths=[lengths for _, lengths in per_key],
        skipped=skipped,
        blank_lines=parsed.blank_lines,
        input_bytes=parsed.input_bytes,
        cpu_seconds=time.process_time() - cpu_start,
    )


def _drop_documents(tokens: np.ndarray, lengths: np.ndarray, keep: np.ndarray):
    owner = np.repeat(np.arange(lengths.size), lengths)
    return tokens[keep[owner]], lengths[keep]


def _append_eod(tokens: np.ndarray, lengths: np.ndarray, eod_id: int):
    return np.insert(tokens, np.cumsum(lengths), np.array(eod_id, dtype=tokens.dtype)), lengths + 1


# ---------------------------------------------------------------------------------------------
# Main process
# ---------------------------------------------------------------------------------------------
class _Progress:
    """A tqdm bar on a terminal; plain log lines every log_interval documents otherwise (cluster logs)."""

    def __init__(self, total_bytes: int, log_interval: int, enabled: bool):
        self.start = time.time()
        self.docs = self.tokens = self.bytes = 0
        self.log_interval = max(1, log_interval)
        self.next_log = self.log_interval
        self.bar = None
        self.enabled = enabled
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="tokenizing", file=sys.stderr)

    def update(self, docs: int, tokens: int, nbytes: int):
        self.docs += docs
        self.tokens += tokens
        self.bytes += nbytes
        elapsed = max(time.time() - self.start, 1e-9)
        if self.bar is not None:
            self.bar.update(nbytes)
            self.bar.set_postfix_str(f"{self.docs / elapsed:,.0f} docs/s, {self.tokens / elapsed / 1e6:.2f} M tok/s",
                                     refresh=False)
        elif self.enabled and self.docs >= self.next_log:
            self.next_log = (self.docs // self.log_interval + 1) * self.log_interval
            print(f"processed {self.docs:,} documents, {self.tokens:,} tokens "
                  f"({self.docs / elapsed:,.0f} docs/s, {self.tokens / elapsed / 1e6:.2f} M tokens/s, "
                  f"{self.bytes / elapsed / 1e6:.1f} MB/s)", file=sys.stderr, flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def no_document_message(summary: PreprocessSummary, config: PreprocessConfig) -> str:
    """Why nothing was written: the most common reasons records were skipped, with their first places."""
    n = len(config.input_files)
    what = f"no valid document in {n} input file{'s' if n != 1 else ''} ({', '.join(config.input_files[:3])}" \
           f"{', ...' if n > 3 else ''}); nothing written"
    if summary.total_skipped:
        reasons = []
        for category, count in summary.skipped.most_common(3):
            places = ", ".join(r.where() for r in summary.skipped_examples[category][:2])
            reasons.append(f"{count:,} x {category} ({places})")
        more = len(summary.skipped) - 3
        keys = ", ".join(config.json_keys)
        return (f"{what}: {summary.total_skipped:,} records skipped: {'; '.join(reasons)}"
                f"{f'; and {more} more reasons' if more > 0 else ''} (--json-keys is {keys})")
    if summary.blank_lines:
        return f"{what}: the inputs hold only {summary.blank_lines:,} blank lines"
    return f"{what}: the inputs are empty"


def output_prefix_for_key(output_prefix: str, key: str) -> str:
    return f"{output_prefix}_{key}_document"  # Megatron-LM's naming


def preprocess(config: PreprocessConfig) -> PreprocessSummary:
    """Tokenize config.input_files into one dataset per json key; returns what happened."""
    if config.text_documents not in ("line", "file"):
        raise ValueError(f"text_documents must be 'line' or 'file', got {config.text_documents!r}")
    if not config.input_files:
        raise PreprocessError("no input files (--input)")
    if config.workers < 1:
        raise PreprocessError(f"--workers must be at least 1, got {config.workers}")
    start = time.time()
    cpu_start = resource.getrusage(resource.RUSAGE_SELF)
    keys = list(config.json_keys)
    formats = {input_format(p) for p in config.input_files}
    if "text" in formats and len(keys) != 1:
        raise PreprocessError(f"text inputs hold one document per {config.text_documents}, so they take exactly "
                              f"one json key (--json-keys; it names the output); got {keys}")
    check_inputs(config.input_files, keys)
    # fail fast, before forking
    tokenizer = build_tokenizer(config.tokenizer_type, config.tokenizer_model, eod_token=config.tokenizer_eod)
    dtype = token_dtype_for_vocab(tokenizer.vocab_size)
    if config.show_progress:  # after the up-front checks, so that an error is the only line
        print(f"tokenizing {len(config.input_files)} inputs with {config.workers} workers", file=sys.stderr)
    outputs = {key: output_prefix_for_key(config.output_prefix, key) for key in keys}
    summary = PreprocessSummary(output_paths=outputs, tokens={key: 0 for key in keys},
                                shuffle_seed=config.shuffle_seed)
    total_bytes = sum(input_bytes(p, input_format(p)) for p in config.input_files)
    lines_before: Dict[str, int] = defaultdict(int)  # lines of each file already seen, for line numbers
    worker_cpu: List[float] = []

    # The outputs open before the workers fork: an output that cannot be written fails with no pool to tear
    # down (terminating a pool whose workers are still starting could hang under load: CI, 2026-12-07).
    writers: Dict[str, IndexedDatasetWriter] = {}
    try:
        for key, prefix in outputs.items():
            writers[key] = IndexedDatasetWriter(first_pass_prefix(prefix, config.shuffle_seed), dtype)
        # fork is cheap and safe here (no threads yet); fall back to spawn where fork does not exist.
        method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
        pool = multiprocessing.get_context(method).Pool(
            config.workers, initializer=_init_worker,
            initargs=(config.tokenizer_type, config.tokenizer_model, keys, config.append_eod, dtype,
                      config.tokenizer_eod))
    except BaseException:
        for writer in writers.values():
            writer.abort()
        raise
    progress = _Progress(total_bytes, config.log_interval, config.show_progress)
    # Pool.imap reads its input eagerly; this bounds the units in flight (gzip units carry data).
    in_flight = threading.Semaphore(4 * config.workers)
    stopping = threading.Event()  # lets the pool's feeder thread exit if we stop early

    def bounded_units():
        for unit in iter_work_units(config.input_files, config.text_documents, config.chunk_bytes):
            while not in_flight.acquire(timeout=0.1):
                if stopping.is_set():
                    return
            yield unit

    try:
        for result in pool.imap(tokenize_unit, bounded_units()):
            in_flight.release()
            for line_no, category, detail in result.skipped:
                line = lines_before[result.path] + line_no if line_no else 0
                record = SkippedRecord(result.path, line, category, detail)
                if config.strict:
                    raise PreprocessError(f"{record} (strict mode: fix the input, or drop --strict to skip "
                                          f"and report bad records)")
                summary.skipped[category] += 1
                if len(summary.skipped_examples[category]) < config.report_examples:
                    summary.skipped_examples[category].append(record)
            lines_before[result.path] += result.num_lines
            for key, tokens, lengths in zip(keys, result.tokens, result.lengths):
                writers[key].add_documents(tokens, lengths)
                summary.tokens[key] += int(tokens.size)
            summary.documents += result.num_documents
            summary.blank_lines += result.blank_lines
            worker_cpu.append(result.cpu_seconds)
            progress.update(result.num_documents, sum(int(t.size) for t in result.tokens), result.input_bytes)
        pool.close()
        if summary.documents == 0:
            raise PreprocessError(no_document_message(summary, config))
        if config.shuffle_seed is not None:
            if config.show_progress:
                print(f"shuffling {summary.documents:,} documents (seed {config.shuffle_seed})", file=sys.stderr)
            writers = shuffle_pass(writers, outputs, config.shuffle_seed, summary.documents)
        # The tokenizer record ({prefix}.tokenizer.json) describes the new data only: a stale one goes
        # first, so an interruption leaves no record (accepted, like Megatron data), never a wrong one.
        for prefix in outputs.values():
            if os.path.exists(sidecar_path(prefix)):
                os.remove(sidecar_path(prefix))
        for writer in writers.values():
            writer.finalize()
        for prefix in outputs.values():
            try:
                write_sidecar(prefix, tokenizer)
            except OSError as e:
                raise OutputError(e, os.path.dirname(os.path.abspath(prefix)),
                                  f"{prefix}.bin/.idx were written, but not its tokenizer record "
                                  f"{sidecar_path(prefix)}: re-run to get it") from e
    except BaseException:
        stopping.set()
        pool.terminate()
        for writer in writers.values():
            writer.abort()
        raise
    finally:
        progress.close()
        pool.join()
        if config.shuffle_seed is not None:
            for prefix in outputs.values():
                remove_dataset(first_pass_prefix(prefix, config.shuffle_seed))
    summary.seconds = time.time() - start
    own = resource.getrusage(resource.RUSAGE_SELF)
    summary.main_process_cpu_seconds = (own.ru_utime - cpu_start.ru_utime) + (own.ru_stime - cpu_start.ru_stime)
    summary.worker_cpu_seconds = sum(worker_cpu)
    return summary
