"""GPT-style samples of seq_len + 1 tokens drawn from an indexed dataset, the way Megatron-LM draws them.

The documents of a split are laid end to end, epoch after epoch, in a seeded shuffled order; sample i is
tokens [i * seq_len, i * seq_len + seq_len + 1) of that stream (one extra token for the shifted labels),
and samples are read in a seeded shuffled order. Three index arrays describe this:

  document_index  document ids for all epochs, shuffled (the last partial epoch shuffled on its own when
                  it is under 80% full, so its few documents are not diluted across the whole run)
  sample_index    [num_samples + 1, 2]: (position in document_index, token offset) where each sample starts
  shuffle_index   the order in which samples are read

They follow Megatron-LM's GPTDataset construction (same RNG calls, same arrays), built with vectorized
numpy: the sample index is one cumsum and one searchsorted instead of a per-token loop. They are cached
on disk (index_cache.py) under a key of the dataset files, split, seq_len, num_samples and seed.

"Documents" here are the sequences of the indexed dataset, as in Megatron-LM; they are the same thing
unless the corpus was preprocessed with sentence splitting.
"""
import math
import re
from typing import List, Optional, Sequence, Tuple

import numpy as np

from megaloop.data.index_cache import build_or_load_arrays, file_fingerprint
from megaloop.data.indexed_dataset import DataError, IndexedDataset

SPLIT_NAMES = ("train", "valid", "test")
INDEX_FORMAT_VERSION = 1  # bump when the construction below changes, to invalidate old caches


def parse_split(split: str, num_documents: int) -> List[Tuple[int, int]]:
    """'969,30,1' -> [(start, end)] document ranges for train/valid/test, disjoint and covering all documents.

    Weights are normalized; missing trailing weights are 0. Rounding follows Megatron-LM: each range gets
    round(weight * num_documents) and the rounding surplus is taken off every boundary after the first.
    """
    parts = [p for p in re.split(r"[,/\s]+", split.strip()) if p]
    try:
        weights = [float(p) for p in parts]
    except ValueError:
        weights = None
    if weights is None or not 1 <= len(weights) <= 3 or any(w < 0 or not math.isfinite(w) for w in weights) \
            or sum(weights) <= 0:
        raise DataError(f"split {split!r} (data.split / --split): expected 1 to 3 comma-separated non-negative "
                        f"weights with a positive sum, for train,valid,test, such as '969,30,1'")
    weights += [0.0] * (3 - len(weights))
    total = sum(weights)
    bounds = [0]
    for w in weights:
        bounds.append(bounds[-1] + int(round(w / total * num_documents)))
    surplus = bounds[-1] - num_documents
    bounds = [0] + [max(0, b - surplus) for b in bounds[1:]]
    return [(bounds[i], bounds[i + 1]) for i in range(3)]


def build_document_index(documents: np.ndarray, num_epochs: int, rng: np.random.RandomState,
                         separate_final_epoch: bool) -> np.ndarray:
    if not separate_final_epoch or num_epochs == 1:
        document_index = np.tile(documents.astype(np.int32), num_epochs)
        rng.shuffle(document_index)
        return document_index
    first = build_document_index(documents, num_epochs - 1, rng, False)
    last = build_document_index(documents, 1, rng, False)
    return np.concatenate((first, last))


def build_sample_index(sequence_lengths: np.ndarray, document_index: np.ndarray, seq_len: int) -> np.ndarray:
    """(document position, offset) of the start of every sample, and of the end of the last.

    Sample i starts at stream position i * seq_len; it is found in the cumulative document lengths with
    searchsorted(side='right'), which also skips empty documents exactly as Megatron-LM's C++ loop does.
    """
    lengths = sequence_lengths[document_index].astype(np.int64)
    ends = np.cumsum(lengths)
    total_tokens = int(ends[-1]) if ends.size else 0
    num_samples = (total_tokens - 1) // seq_len  # each sample needs seq_len + 1 tokens
    starts = np.arange(num_samples + 1, dtype=np.int64) * seq_len
    positions = np.searchsorted(ends, starts, side="right")
    offsets = starts - (ends[positions] - lengths[positions])
    dtype = np.int32 if max(document_index.size, int(lengths.max(initial=0))) < 2 ** 31 else np.int64
    return np.stack([positions, offsets], axis=1).astype(dtype)


def build_shuffle_index(num_samples: int, total_size: int, rng: np.random.RandomState) -> np.ndarray:
    """A permutation of [0, num_samples) followed by a separate permutation of [num_samples, total_size)."""
    dtype = np.uint32 if total_size < np.iinfo(np.uint32).max - 1 else np.int64
    first = np.arange(num_samples, dtype=dtype)
    rng.shuffle(first)
    if num_samples == total_size:
        return first
    last = np.arange(num_samples, total_size, dtype=dtype)
    rng.shuffle(last)
    return np.concatenate((first, last))


class GPTDataset:
    """Samples of seq_len + 1 tokens (numpy int64) from documents [start, end) of an indexed dataset.

    len() is at least num_samples: the last epoch is used in full, as Megatron-LM does. Everything is a
    pure function of (dataset files, document range, seq_len, num_samples, seed).
    """

    def __init__(self, indexed_dataset: IndexedDataset, document_range: Tuple[int, int], seq_len: int,
                 num_samples: int, seed: int, cache_dir: Optional[str] = None, name: str = "train"):
        start, end = document_range
        if not 0 <= start < end <= len(indexed_dataset):
            raise DataError(f"{name}: document range [{start}, {end}) is empty or outside the "
                            f"{len(indexed_dataset)} documents of {indexed_dataset.path_prefix}: check data.split")
        if seq_len < 1 or num_samples < 1:
            raise DataError(f"{name}: seq_len and num_samples must be positive, got {seq_len} and {num_samples}")
        self.indexed_dataset = indexed_dataset
        self.document_range = (int(start), int(end))
        self.seq_len = int(seq_len)
        self.num_samples = int(num_samples)
        self.seed = int(seed)
        self.name = name
        self.cache_dir = cache_dir
        self.description = {
            "class": "GPTDataset",
            "format_version": INDEX_FORMAT_VERSION,
            "bin": file_fingerprint(indexed_dataset.bin_path),
            "idx": file_fingerprint(indexed_dataset.idx_path),
            "document_range": list(self.document_range),
            "seq_len": self.seq_len,
            "num_samples": self.num_samples,
            "seed": self.seed,
        }
        arrays = build_or_load_arrays(cache_dir, f"gpt_{name}", self.description, self._build_indices)
        self.document_index = arrays["document_index"]
        self.sample_index = arrays["sample_index"]
        self.shuffle_index = arrays["shuffle_index"]

    def _build_indices(self):
        lengths = self.indexed_dataset.sequence_lengths
        documents = np.arange(*self.document_range, dtype=np.int32)
        tokens_per_epoch = int(lengths[self.document_range[0]:self.document_range[1]].sum(dtype=np.int64))
        if tokens_per_epoch < self.seq_len + 1:
            raise DataError(f"{self.name} split of {self.indexed_dataset.path_prefix}: documents "
                            f"[{self.document_range[0]}, {self.document_range[1]}) hold {tokens_per_epoch} tokens, "
                            f"fewer than one sample of data.seq_len + 1 = {self.seq_len + 1}: lower data.seq_len, "
                            f"give this split more documents (data.split) or use more data")
        tokens_needed = self.num_samples * self.seq_len + 1
        num_epochs = max(1, -(-tokens_needed // tokens_per_epoch))
        separate_final_epoch = False
        if num_epochs > 1:
            samples_before_final = ((num_epochs - 1) * tokens_per_epoch - 1) // self.seq_len
            samples_from_final = self.num_samples - samples_before_final
            samples_per_epoch = (tokens_per_epoch - 1) // self.seq_len
            separate_final_epoch = samples_from_final < int(0.80 * samples_per_epoch)
        rng = np.random.RandomState(self.seed)
        document_index = build_document_index(documents, num_epochs, rng, separate_final_epoch)
        sample_index = build_sample_index(lengths, document_index, self.seq_len)
        total = sample_index.shape[0] - 1
        shuffled = samples_before_final if separate_final_epoch else total
        shuffle_index = build_shuffle_index(shuffled, total, rng)
        return {"document_index": document_index, "sample_index": sample_index, "shuffle_index": shuffle_index}

    def __len__(self) -> int:
        return self.shuffle_index.shape[0]

    _INDEX_ARRAYS = ("document_index", "sample_index", "shuffle_index")

    def __getstate__(self):
        # DataLoader workers under spawn: send cache paths, not copies of memory-mapped index arrays.
        state = dict(self.__dict__)
        if self.cache_dir is not None:
            for key in self._INDEX_ARRAYS:
                state.pop(key)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        if self.cache_dir is not None:
            arrays = build_or_load_arrays(self.cache_dir, f"gpt_{self.name}", self.description, self._build_indices)
            for key in self._INDEX_ARRAYS:
                setattr(self, key, arrays[key])

    def __getitem__(self, idx: int) -> np.ndarray:
        if not 0 <= idx < len(self):
            raise IndexError(f"sample {idx} out of range for {self.name} dataset of {len(self)} samples")
        i = int(self.shuffle_index[idx])
        first_pos, first_offset = (int(v) for v in self.sample_index[i])
        last_pos, last_offset = (int(v) for v in self.sample_index[i + 1])
        data = self.indexed_dataset
        docs = self.document_index[first_pos:last_pos + 1]
        starts = data._token_offsets[docs]  # first token of each document in .bin
        lengths = data.sequence_lengths[docs].astype(np.int64)
        starts[0] += first_offset
        lengths[0] -= first_offset
        lengths[-1] = last_offset + 1 - (first_offset if len(docs) == 1 else 0)
        if len(docs) == 1:
            return data.tokens[starts[0]:starts[0] + lengths[0]].astype(np.int64)
        # One gather over all the pieces instead of a Python loop of slices: position k of the sample
        # reads token starts[piece] + (k - first position of that piece).
        piece_starts = np.cumsum(lengths) - lengths
        positions = np.repeat(starts - piece_starts, lengths) + np.arange(int(lengths.sum()))
        return data.tokens[positions].astype(np.int64)

    def __repr__(self):
        return (f"GPTDataset({self.name}, {self.indexed_dataset.path_prefix}, documents={self.document_range}, "
                f"seq_len={self.seq_len}, samples={len(self)})")


def split_datasets(indexed_dataset: IndexedDataset, split: str, seq_len: int, num_samples: Sequence[int],
                   seed: int, cache_dir: Optional[str] = None) -> List[Optional[GPTDataset]]:
    """train/valid/test GPTDatasets of one indexed dataset; None where no samples are requested."""
    ranges = parse_split(split, len(indexed_dataset))
    datasets = []
    for name, (start, end), n in zip(SPLIT_NAMES, ranges, num_samples):
        if not n:
            datasets.append(None)
            continue
        if start == end:
            raise DataError(f"{name}: split {split!r} (data.split) leaves no documents of "
                            f"{indexed_dataset.path_prefix} ({len(indexed_dataset)} documents) for the {n} samples "
                            f"requested: give {name} a larger weight, or use more data")
        datasets.append(GPTDataset(indexed_dataset, (start, end), seq_len, n, seed, cache_dir, name))
    return datasets
