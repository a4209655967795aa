"""`preprocess_data.py --shuffle-seed S`: the documents of a written dataset in a seeded random order.

Why: training already visits samples in a shuffled order (GPTDataset's shuffle index, as in Megatron-LM), but
`data.split` cuts train / validation / test as contiguous document ranges. A corpus that comes sorted (by
source, date, length, file name) then validates on its tail only. Shuffling the documents once at
preprocessing makes every contiguous range a fair sample.

How: a second pass over the dataset the first pass wrote (under a temporary name): the permutation is
np.random.RandomState(seed).permutation(documents) (the legacy generator, whose stream numpy keeps stable
across versions, as Megatron-LM's index builders do), and the tokens are gathered from the memory-mapped
first-pass .bin in blocks of `block_tokens`. Memory: a few int64 arrays of one entry per document plus one
block; no text is held. Disk: the dataset twice, until the first pass is removed. Every json key's dataset
gets the same permutation, so they stay aligned document for document.
"""
import os
from typing import Dict

import numpy as np

from megaloop.data.indexed_dataset import IndexedDataset, IndexedDatasetWriter, dataset_paths


def document_order(num_documents: int, seed: int) -> np.ndarray:
    """The new position's source document: a pure function of (count, seed)."""
    return np.random.RandomState(seed).permutation(num_documents)


def write_shuffled(source_prefix: str, writer: IndexedDatasetWriter, order: np.ndarray,
                   block_tokens: int = 1 << 23) -> None:
    """Append the documents of source_prefix to writer in `order` (documents of one sequence each, as
    preprocessing writes them)."""
    source = IndexedDataset(source_prefix)
    if source.num_documents != len(source) or len(order) != len(source):
        raise ValueError(f"{source_prefix}: {len(source)} sequences in {source.num_documents} documents, "
                         f"order of {len(order)}: expected one sequence per document")
    lengths = source.sequence_lengths.astype(np.int64)[order]
    offsets = (source.sequence_pointers // source.dtype.itemsize)[order]
    ends = np.cumsum(lengths)
    start = 0
    while start < len(order):
        before = int(ends[start - 1]) if start else 0
        stop = max(start + 1, int(np.searchsorted(ends, before + block_tokens, side="right")))
        block_lengths, block_offsets = lengths[start:stop], offsets[start:stop]
        total = int(block_lengths.sum())
        # Token j of the block comes from its document's offset plus j's position within that document.
        starts_in_block = np.cumsum(block_lengths) - block_lengths
        gather = np.repeat(block_offsets - starts_in_block, block_lengths) + np.arange(total, dtype=np.int64)
        writer.add_documents(source.tokens[gather], block_lengths)
        start = stop


def first_pass_prefix(prefix: str, seed) -> str:
    """Where the first pass writes when the documents are shuffled afterwards (a name no reader looks for)."""
    return prefix if seed is None else f"{prefix}.unshuffled-{os.getpid()}"


def shuffle_pass(first_pass: Dict[str, IndexedDatasetWriter], outputs: Dict[str, str], seed: int,
                 num_documents: int) -> Dict[str, IndexedDatasetWriter]:
    """Finalize the first-pass writers and return writers (not yet finalized) holding every key's documents
    in the seeded order; the first-pass files are removed here, or by remove_first_pass after a failure."""
    order = document_order(num_documents, seed)
    shuffled = {}
    try:
        for key, writer in first_pass.items():
            source = writer.bin_path[:-len(".bin")]
            writer.finalize()
            shuffled[key] = IndexedDatasetWriter(outputs[key], writer.dtype)
            write_shuffled(source, shuffled[key], order)
            remove_dataset(source)
    except BaseException:
        for writer in shuffled.values():
            writer.abort()
        raise
    return shuffled


def remove_dataset(prefix: str) -> None:
    for path in dataset_paths(prefix):
        if os.path.exists(path):
            os.remove(path)
