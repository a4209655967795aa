"""megaloop's data pipeline: tokenizers, Megatron-compatible indexed datasets, sampling and blending.

The trainer (through megaloop/training/data.py) makes two calls:

    datasets = build_datasets(["0.7", "data/a_text_document", "0.3", "data/b_text_document"], split="969,30,1",
                              seq_len=2048, num_samples={"train": 1_000_000, "valid": 10_000}, seed=1234,
                              cache_dir="data/index-cache")
    loader = build_data_loader(datasets["train"], consumed_samples, micro_batch_size, dp_rank, dp_size,
                               num_workers=data.num_workers)

The loader is a torch DataLoader over PretrainingSampler (resumable, one slice per data-parallel rank)
collating with collate_samples; TrainBatches wraps it, splitting inputs from labels and attaching each
micro-batch's loop count in the main process. Nothing here imports torch except the loader functions, so
the preprocessing tools stay light.
"""
import os
import sys
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from megaloop.data.blended_dataset import BlendedDataset, samples_needed_per_dataset
from megaloop.data.gpt_dataset import SPLIT_NAMES, GPTDataset, parse_split, split_datasets
from megaloop.data.indexed_dataset import DataError, IndexedDataset, IndexedDatasetError, IndexedDatasetWriter
from megaloop.data.sampler import PretrainingSampler, build_data_loader
from megaloop.data.tokenizer import Tokenizer, build_tokenizer

__all__ = [
    "BlendedDataset", "DataError", "GPTDataset", "IndexedDataset", "IndexedDatasetError", "IndexedDatasetWriter",
    "PretrainingSampler", "Tokenizer",
    "build_data_loader", "build_datasets", "build_tokenizer", "parse_data_paths", "parse_split",
]


def parse_data_paths(data_paths: Union[str, Sequence]) -> Tuple[List[str], List[float]]:
    """Megatron's data_path forms -> (paths, weights).

    "prefix" or ["prefix"]: one dataset. [w1, prefix1, w2, prefix2, ...] (weights as numbers or strings)
    or [(w1, prefix1), ...]: a weighted blend.
    """
    if isinstance(data_paths, str):
        data_paths = data_paths.split()
    items = list(data_paths)
    if items and all(isinstance(x, (tuple, list)) and len(x) == 2 for x in items):
        items = [v for pair in items for v in pair]
    if len(items) == 1:
        return [str(items[0])], [1.0]
    if not items or len(items) % 2:
        raise DataError(f"data.data_path {data_paths!r}: expected one path, or weight, path, weight, path, ...")
    paths, weights = [], []
    for weight, path in zip(items[0::2], items[1::2]):
        try:
            weights.append(float(weight))
        except (TypeError, ValueError):
            raise DataError(f"data.data_path {data_paths!r}: {weight!r} should be the weight (a number) of "
                            f"{path!r}; write weight, path, weight, path, ...") from None
        paths.append(str(path))
    return paths, weights


def check_tokens_fit_vocab(dataset: IndexedDataset, tokenizer: Tokenizer, max_tokens: int = 1 << 20):
    """Catch a dataset made with another tokenizer: its first tokens must be ids of this vocabulary."""
    head = np.asarray(dataset.tokens[:max_tokens])
    if head.size and int(head.max()) >= tokenizer.vocab_size:
        raise DataError(f"{dataset.path_prefix} holds token id {int(head.max())}, but the tokenizer "
                        f"(data.tokenizer_type / data.tokenizer_model) has only {tokenizer.vocab_size} ids: was it "
                        f"preprocessed with another tokenizer? Re-run tools/preprocess_data.py with this one")


def default_cache_dir(data_path: str) -> Optional[str]:
    """{directory of the data}/index-cache, as Megatron-LM does; None (build in memory) if not writable."""
    data_dir = os.path.dirname(os.path.abspath(data_path))
    cache_dir = os.path.join(data_dir, "index-cache")
    if os.access(cache_dir if os.path.isdir(cache_dir) else data_dir, os.W_OK):
        return cache_dir
    print(f"note: {data_dir} is not writable, so sampling indices are built in memory by every rank; "
          f"set data.cache_dir to cache them", file=sys.stderr)
    return None


def build_datasets(data_paths_with_weights, split: str, seq_len: int, num_samples: Dict[str, int], seed: int,
                   cache_dir: Optional[str] = None, tokenizer: Optional[Tokenizer] = None) -> Dict[str, object]:
    """{"train", "valid", "test"} datasets (None where no samples are asked for).

    Each indexed dataset is split by document with `split`; with several weighted paths, each split is a
    BlendedDataset over the same split of every path. Items are int64 arrays of seq_len + 1 tokens.
    Sampling indices are cached in cache_dir, by default an index-cache directory next to the first path.
    """
    unknown = set(num_samples) - set(SPLIT_NAMES)
    if unknown:
        raise DataError(f"num_samples has unknown splits {sorted(unknown)}; use {SPLIT_NAMES}")
    paths, weights = parse_data_paths(data_paths_with_weights)
    indexed = [IndexedDataset(path) for path in paths]
    if cache_dir is None:
        cache_dir = default_cache_dir(paths[0])
    if tokenizer is not None:
        for ds in indexed:
            check_tokens_fit_vocab(ds, tokenizer)
    requested = [int(num_samples.get(name) or 0) for name in SPLIT_NAMES]
    if len(indexed) == 1:
        return dict(zip(SPLIT_NAMES, split_datasets(indexed[0], split, seq_len, requested, seed, cache_dir)))

    # Ask each dataset for the most samples the blend can take from it (weight * n + 1).
    per_dataset = []
    for d, (ds, weight) in enumerate(zip(indexed, weights)):
        wanted = [samples_needed_per_dataset(weights, n)[d] if n and weight > 0 else 0 for n in requested]
        per_dataset.append(split_datasets(ds, split, seq_len, wanted, seed, cache_dir))
    result = {}
    for i, (name, n) in enumerate(zip(SPLIT_NAMES, requested)):
        result[name] = (BlendedDataset([parts[i] for parts in per_dataset], weights, n, cache_dir, name)
                        if n else None)
    return result
