"""Megatron-LM's memory-mapped indexed dataset (MMIDIDX): a .bin of raw tokens plus an .idx describing it.

The byte layout (little-endian) is exactly Megatron-LM's, so files move freely between the two:

    .idx  offset 0      9 bytes   magic b"MMIDIDX\\x00\\x00"
          offset 9      uint64    version = 1
          offset 17     uint8     dtype code of the tokens (DTYPE_CODES)
          offset 18     uint64    N, number of sequences
          offset 26     uint64    D, number of documents + 1
          offset 34     int32[N]  sequence lengths in tokens
                        int64[N]  byte offset of each sequence in .bin
                        int64[D]  document indices: first sequence of each document, first 0, last N
                        int8[N]   sequence modes, only in multimodal files (detected from the file size)
    .bin  the tokens of all sequences, concatenated, no header.

The writer writes under temporary names and renames into place only in finalize(), so an interrupted
run never leaves a pair of files that looks valid. The reader memory-maps both files: opening is O(1) in
the corpus size apart from cheap vectorized checks, and any sequence or token range is an O(1) view.
"""
import os
import struct
from typing import Optional, Union

import numpy as np

from megaloop.errors import MegaloopError, OutputError
from megaloop.tempfiles import remove_stale, temp_suffix

INDEX_MAGIC = b"MMIDIDX\x00\x00"
INDEX_VERSION = 1
HEADER_SIZE = 34  # magic 9 + version 8 + dtype code 1 + N 8 + D 8

# Megatron-LM's codes. GPT-NeoX swaps 6 and 7 (float32/float64); tokens are never floats, so both are
# rejected below and the swap never matters.
DTYPE_CODES = {
    1: np.dtype(np.uint8),
    2: np.dtype(np.int8),
    3: np.dtype(np.int16),
    4: np.dtype(np.int32),
    5: np.dtype(np.int64),
    6: np.dtype(np.float64),
    7: np.dtype(np.float32),
    8: np.dtype(np.uint16),
}


def dtype_code(dtype) -> int:
    """The header code of an integer token dtype."""
    dtype = np.dtype(dtype)
    for code, candidate in DTYPE_CODES.items():
        if candidate == dtype and dtype.kind in "iu":
            return code
    raise ValueError(f"{dtype} is not a token dtype of the indexed format (uint8, int8, int16, int32, int64, uint16)")


def dtype_from_code(code: int) -> np.dtype:
    if code not in DTYPE_CODES:
        raise ValueError(f"unknown dtype code {code} (valid codes: {sorted(DTYPE_CODES)})")
    dtype = DTYPE_CODES[code]
    if dtype.kind == "f":
        raise ValueError(f"dtype code {code} is a float type; token data must be integers")
    return dtype


def token_dtype_for_vocab(vocab_size: int) -> np.dtype:
    """Megatron-LM's rule: uint16 when the vocabulary has fewer than 65,500 entries, else int32."""
    return np.dtype(np.uint16) if vocab_size < 65500 else np.dtype(np.int32)


def dataset_paths(path_prefix: str):
    """(bin_path, idx_path) for a prefix; a path given with its .bin/.idx extension is accepted too."""
    if path_prefix.endswith((".bin", ".idx")):
        path_prefix = path_prefix[:-4]
    return path_prefix + ".bin", path_prefix + ".idx"


class DataError(MegaloopError, ValueError):
    """A dataset, data path, blend, split or input that cannot be used; the one-line message names the file
    or field and the fix."""


class IndexedDatasetError(DataError):
    """A .bin/.idx pair that is not a valid indexed dataset; the message names the file and the problem."""


class DatasetNotFoundError(IndexedDatasetError, FileNotFoundError):
    """No .bin/.idx pair at a path prefix (still a FileNotFoundError, as before)."""


def missing_dataset_message(path_prefix: str) -> Optional[str]:
    """None when {prefix}.bin and .idx both exist, else a one-line message naming the missing file, with
    the likely intended prefix when one is nearby (preprocess_data.py appends _{key}_document)."""
    bin_path, idx_path = dataset_paths(path_prefix)
    missing = [p for p in (idx_path, bin_path) if not os.path.isfile(p)]
    if not missing:
        return None
    prefix = idx_path[:-4]
    if len(missing) == 1:
        other = bin_path if missing[0] == idx_path else idx_path
        return (f"{missing[0]}: no such file, but {other} exists: a dataset needs both files (copy the missing "
                f"one, or re-run tools/preprocess_data.py)")
    import glob

    near = sorted(p[:-4] for p in glob.glob(glob.escape(prefix) + "_*_document.idx"))
    hint = (f"; did you mean {near[0]}? (tools/preprocess_data.py names its output {{prefix}}_{{key}}_document)"
            if near else "; a dataset is named by its path without .bin/.idx")
    return f"{idx_path}: no such file (nor {os.path.basename(bin_path)}){hint}"


class IndexedDatasetWriter:
    """Write documents to {path_prefix}.bin/.idx.

    Use as a context manager: a clean exit finalizes (renames into place), an exception removes the
    temporary files. add_documents() is the fast path for many one-sequence documents at once.
    """

    def __init__(self, path_prefix: str, dtype):
        self.dtype = np.dtype(dtype)
        self._dtype_code = dtype_code(self.dtype)
        self.bin_path, self.idx_path = dataset_paths(path_prefix)
        self.folder = os.path.dirname(os.path.abspath(self.bin_path))
        suffix = f"{temp_suffix()}-{id(self):x}"
        for final in (self.bin_path, self.idx_path):  # what a killed writer of this dataset left
            remove_stale(self.folder, os.path.basename(final))
        self._tmp_bin_path = self.bin_path + suffix
        self._tmp_idx_path = self.idx_path + suffix
        try:
            os.makedirs(self.folder, exist_ok=True)
            self._bin = open(self._tmp_bin_path, "wb", buffering=8 << 20)
        except OSError as e:
            raise self._output_error(e, self.folder) from e
        self._length_chunks = []  # int32 arrays, one per add call
        self._document_end_chunks = []  # int64 arrays: sequence count after each document
        self.num_sequences = 0
        self.num_tokens = 0
        self._done = False

    def _output_error(self, err: OSError, path=None) -> OutputError:
        """The one-line error for an OSError while writing: names the folder (or path) and says that
        nothing is left behind (the temporary files are removed; an existing dataset is untouched)."""
        return OutputError(err, path or self.folder, f"nothing was written for {self.bin_path[:-4]} (an existing "
                                                     f"dataset there is untouched)")

    def _write(self, data) -> None:
        try:
            self._bin.write(data)
        except OSError as e:
            self.abort()
            raise self._output_error(e) from e

    # -- adding data ---------------------------------------------------------------------------
    def _as_token_array(self, tokens) -> np.ndarray:
        tokens = np.asarray(tokens)
        if tokens.size == 0:
            return tokens.astype(self.dtype)
        if tokens.dtype.kind not in "iu":
            raise TypeError(f"tokens must be integers, got {tokens.dtype}")
        if tokens.dtype != self.dtype:
            if not np.can_cast(tokens.dtype, self.dtype, "safe"):
                # Narrowing (e.g. int32 ids into uint16) is fine only if every id fits; never wrap silently.
                info = np.iinfo(self.dtype)
                lo, hi = int(tokens.min()), int(tokens.max())
                if lo < info.min or hi > info.max:
                    raise ValueError(f"token id range [{lo}, {hi}] does not fit the dataset dtype {self.dtype}")
            tokens = tokens.astype(self.dtype)
        return tokens

    def add_document(self, tokens, sequence_lengths=None):
        """One document; sequence_lengths splits it into several sequences (sentences), default one."""
        tokens = self._as_token_array(tokens).reshape(-1)
        lengths = np.array([tokens.size] if sequence_lengths is None else sequence_lengths, dtype=np.int64)
        if lengths.sum() != tokens.size or (lengths < 0).any():
            raise ValueError(f"sequence lengths {lengths.tolist()} do not add up to the {tokens.size} tokens given")
        self._append(tokens, lengths, np.array([self.num_sequences + lengths.size], dtype=np.int64))

    def add_documents(self, tokens, lengths):
        """Many documents, each one sequence: tokens is their concatenation, lengths their sizes."""
        tokens = self._as_token_array(tokens).reshape(-1)
        lengths = np.asarray(lengths, dtype=np.int64).reshape(-1)
        if lengths.sum() != tokens.size or (lengths < 0).any():
            raise ValueError(f"document lengths add up to {lengths.sum()}, but {tokens.size} tokens were given")
        ends = self.num_sequences + np.arange(1, lengths.size + 1, dtype=np.int64)
        self._append(tokens, lengths, ends)

    def _append(self, tokens: np.ndarray, lengths: np.ndarray, document_ends: np.ndarray):
        if self._done:
            raise RuntimeError("writer already finalized or aborted")
        if lengths.size and lengths.max() > np.iinfo(np.int32).max:
            raise ValueError("a sequence longer than 2**31-1 tokens cannot be indexed (int32 lengths)")
        self._write(memoryview(np.ascontiguousarray(tokens)).cast("B"))
        self._length_chunks.append(lengths.astype(np.int32))
        self._document_end_chunks.append(document_ends)
        self.num_sequences += int(lengths.size)
        self.num_tokens += int(tokens.size)

    def add_index(self, path_prefix: str, chunk_tokens: int = 1 << 24):
        """Append a whole existing dataset, keeping its document boundaries (used to merge files)."""
        if self._done:
            raise RuntimeError("writer already finalized or aborted")
        other = IndexedDataset(path_prefix)
        if other.sequence_modes is not None:
            raise ValueError(f"{other.idx_path}: multimodal files (with sequence modes) cannot be merged")
        if not np.can_cast(other.dtype, self.dtype, "safe"):
            raise ValueError(f"cannot merge {other.bin_path} ({other.dtype}) into a {self.dtype} dataset "
                             f"without losing token ids; write the merged output as {other.dtype} or wider")
        lengths = other.sequence_lengths.astype(np.int64)
        # Copy the tokens in bounded chunks: the file may be far larger than memory.
        tokens = other.tokens
        for start in range(0, tokens.size, chunk_tokens):
            chunk = np.asarray(tokens[start:start + chunk_tokens]).astype(self.dtype, copy=False)
            self._write(memoryview(np.ascontiguousarray(chunk)).cast("B"))
        self._length_chunks.append(lengths.astype(np.int32))
        self._document_end_chunks.append(other.doc_idx[1:].astype(np.int64) + self.num_sequences)
        self.num_sequences += int(lengths.size)
        self.num_tokens += int(lengths.sum())

    # -- finishing -----------------------------------------------------------------------------
    def finalize(self):
        """Write the .idx and move both files into place (.bin first, old .idx removed before)."""
        if self._done:
            raise RuntimeError("writer already finalized or aborted")
        try:
            self._bin.flush()
            os.fsync(self._bin.fileno())
            self._bin.close()
            lengths = np.concatenate(self._length_chunks) if self._length_chunks else np.zeros(0, np.int32)
            ends = np.concatenate(self._document_end_chunks) if self._document_end_chunks else np.zeros(0, np.int64)
            document_indices = np.concatenate([np.zeros(1, np.int64), ends])
            pointers = np.zeros(lengths.size, dtype=np.int64)
            np.cumsum(lengths[:-1].astype(np.int64) * self.dtype.itemsize, out=pointers[1:])
            with open(self._tmp_idx_path, "wb") as f:
                f.write(INDEX_MAGIC)
                f.write(struct.pack("<Q", INDEX_VERSION))
                f.write(struct.pack("<B", self._dtype_code))
                f.write(struct.pack("<Q", lengths.size))
                f.write(struct.pack("<Q", document_indices.size))
                f.write(lengths.astype("<i4").tobytes())
                f.write(pointers.astype("<i8").tobytes())
                f.write(document_indices.astype("<i8").tobytes())
                f.flush()
                os.fsync(f.fileno())
            # A crash between these steps leaves either the old pair, or a .bin with no .idx: never a
            # new .bin next to an old .idx that would read as a valid but wrong dataset.
            if os.path.exists(self.idx_path):
                os.remove(self.idx_path)
            os.replace(self._tmp_bin_path, self.bin_path)
            os.replace(self._tmp_idx_path, self.idx_path)
        except OSError as e:
            self.abort()
            raise self._output_error(e) from e
        except BaseException:
            self.abort()
            raise
        self._done = True

    def abort(self):
        """Drop everything written so far; the final paths are left untouched."""
        self._done = True
        if not self._bin.closed:
            try:
                self._bin.close()
            except OSError:
                pass  # a full disk can fail the final flush; the file is removed below anyway
        for path in (self._tmp_bin_path, self._tmp_idx_path):
            if os.path.exists(path):
                os.remove(path)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            self.abort()
        elif not self._done:
            self.finalize()


class IndexedDataset:
    """Read a .bin/.idx pair (ours, Megatron-LM's or GPT-NeoX's) through numpy.memmap.

    len() is the number of sequences (= documents unless sentences were split); get(i, offset, length)
    returns a read-only view of sequence i's tokens.
    """

    def __init__(self, path_prefix: str):
        self.path_prefix = path_prefix
        self.bin_path, self.idx_path = dataset_paths(path_prefix)
        self._open()

    def _fail(self, path: str, problem: str):
        raise IndexedDatasetError(f"{path}: {problem}; re-create the dataset with tools/preprocess_data.py (or copy "
                                  f"both .bin and .idx again)")

    def _open(self):
        missing = missing_dataset_message(self.path_prefix)
        if missing:
            raise DatasetNotFoundError(missing)
        idx_size = os.path.getsize(self.idx_path)
        if idx_size < HEADER_SIZE:
            self._fail(self.idx_path, f"truncated: {idx_size} bytes, shorter than the {HEADER_SIZE}-byte header")
        with open(self.idx_path, "rb") as f:
            header = f.read(HEADER_SIZE)
        if header[:9] != INDEX_MAGIC:
            self._fail(self.idx_path, f"wrong magic {header[:9]!r}, expected {INDEX_MAGIC!r}: not an MMIDIDX index "
                                      f"(an old fairseq/'lazy'/'cached' index, or not an index at all)")
        (version,) = struct.unpack("<Q", header[9:17])
        if version != INDEX_VERSION:
            self._fail(self.idx_path, f"unsupported version {version}, expected {INDEX_VERSION}")
        try:
            self.dtype = dtype_from_code(header[17])
        except ValueError as e:
            self._fail(self.idx_path, str(e))
        num_sequences, num_document_indices = struct.unpack("<QQ", header[18:34])
        expected = HEADER_SIZE + 12 * num_sequences + 8 * num_document_indices
        if idx_size < expected:
            self._fail(self.idx_path, f"truncated: header promises {num_sequences} sequences and "
                                      f"{num_document_indices} document indices ({expected} bytes), file has {idx_size}")
        has_modes = idx_size == expected + num_sequences and num_sequences > 0
        if idx_size != expected and not has_modes:
            self._fail(self.idx_path, f"{idx_size - expected} unexpected bytes after the document indices")

        self._idx = np.memmap(self.idx_path, dtype=np.uint8, mode="r")
        buf = self._idx
        self.sequence_lengths = np.frombuffer(buf, dtype="<i4", count=num_sequences, offset=HEADER_SIZE)
        self.sequence_pointers = np.frombuffer(buf, dtype="<i8", count=num_sequences,
                                               offset=HEADER_SIZE + 4 * num_sequences)
        self.doc_idx = np.frombuffer(buf, dtype="<i8", count=num_document_indices,
                                     offset=HEADER_SIZE + 12 * num_sequences)
        self.sequence_modes = (np.frombuffer(buf, dtype=np.int8, count=num_sequences, offset=expected)
                               if has_modes else None)
        self._check_index(num_sequences)

        bin_size = os.path.getsize(self.bin_path)
        itemsize = self.dtype.itemsize
        if num_sequences:
            ends = self.sequence_pointers + self.sequence_lengths.astype(np.int64) * itemsize
            needed = int(ends.max())
            if self.sequence_pointers.min() < 0 or (self.sequence_pointers % itemsize).any():
                self._fail(self.idx_path, f"sequence byte offsets are negative or not multiples of {itemsize}")
        else:
            needed = 0
        if bin_size < needed:
            self._fail(self.bin_path, f"truncated: the index needs {needed} bytes of {self.dtype} tokens, "
                                      f"file has {bin_size}")
        if bin_size > needed:
            self._fail(self.bin_path, f"{bin_size - needed} bytes beyond the last sequence the index describes; "
                                      f"this .bin and {self.idx_path} do not belong together")
        # np.memmap cannot map an empty file; an empty dataset is legal.
        # A plain ndarray view of the map: slicing it skips np.memmap's per-slice Python overhead.
        self.tokens = (np.memmap(self.bin_path, dtype=self.dtype, mode="r").view(np.ndarray) if bin_size
                       else np.zeros(0, dtype=self.dtype))
        self._token_offsets = self.sequence_pointers // itemsize

    def _check_index(self, num_sequences: int):
        doc_idx = self.doc_idx
        if doc_idx.size == 0 or doc_idx[0] != 0 or doc_idx[-1] != num_sequences:
            first = doc_idx[0] if doc_idx.size else None
            last = doc_idx[-1] if doc_idx.size else None
            self._fail(self.idx_path, f"document indices must start at 0 and end at {num_sequences} "
                                      f"(the sequence count), found first={first} last={last}")
        if doc_idx.size > 1 and (np.diff(doc_idx) < 0).any():
            self._fail(self.idx_path, "document indices are not non-decreasing")
        if num_sequences and self.sequence_lengths.min() < 0:
            self._fail(self.idx_path, "negative sequence length")

    # -- access --------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.sequence_lengths.size

    @property
    def num_documents(self) -> int:
        return self.doc_idx.size - 1

    @property
    def document_indices(self) -> np.ndarray:  # Megatron-LM's newer name
        return self.doc_idx

    def get(self, idx: int, offset: int = 0, length: Optional[int] = None) -> np.ndarray:
        """Tokens [offset, offset + length) of sequence idx, as a read-only view."""
        n = len(self)
        if not -n <= idx < n:
            raise IndexError(f"sequence {idx} out of range for {self.path_prefix} with {n} sequences")
        idx = int(idx) % n
        size = int(self.sequence_lengths[idx])
        if length is None:
            length = size - offset
        if offset < 0 or length < 0 or offset + length > size:
            raise IndexError(f"tokens [{offset}, {offset + length}) out of range for sequence {idx} of length {size}")
        start = int(self._token_offsets[idx]) + offset
        return self.tokens[start:start + length]

    def __getitem__(self, idx: Union[int, slice]):
        if isinstance(idx, slice):
            return [self.get(i) for i in range(*idx.indices(len(self)))]
        return self.get(idx)

    def get_document(self, document: int) -> np.ndarray:
        """All tokens of a document (its sequences are contiguous in files written by Megatron-LM or megaloop)."""
        first, last = int(self.doc_idx[document]), int(self.doc_idx[document + 1])
        if first == last:
            return self.tokens[0:0]
        start = int(self._token_offsets[first])
        end = int(self._token_offsets[last - 1]) + int(self.sequence_lengths[last - 1])
        return self.tokens[start:end]

    def __getstate__(self):
        # Pickling (DataLoader workers under spawn) passes the path, never the mapped data.
        return {"path_prefix": self.path_prefix}

    def __setstate__(self, state):
        self.__init__(state["path_prefix"])

    def __repr__(self):
        return (f"IndexedDataset({self.path_prefix!r}, sequences={len(self)}, documents={self.num_documents}, "
                f"dtype={self.dtype})")
