"""A weighted mix of datasets, interleaved by the greedy max-error rule.

For every next sample the dataset whose share so far lags its weight the most is chosen (Megatron-LM's
rule, ties to the lower index). Each dataset's count therefore stays within one sample of weight * n at
every prefix n of the run, not only on average.
"""
import math
from typing import Optional, Sequence

import numpy as np

from megaloop.data.index_cache import build_or_load_arrays
from megaloop.data.indexed_dataset import DataError


def normalize_weights(weights: Sequence[float]) -> np.ndarray:
    try:
        weights = np.asarray(weights, dtype=np.float64)
    except (TypeError, ValueError):
        raise DataError(f"blend weights (data.data_path: weight, path, weight, path, ...) must be numbers, got "
                        f"{list(weights)!r}") from None
    if weights.ndim != 1 or weights.size == 0:
        raise DataError("blending needs at least one weight (data.data_path: weight, path, weight, path, ...)")
    if not np.isfinite(weights).all() or (weights < 0).any() or weights.sum() <= 0:
        raise DataError(f"blend weights in data.data_path must be finite and non-negative with a positive sum, "
                        f"got {weights.tolist()}")
    return weights / weights.sum()


def build_blending_indices(weights: Sequence[float], num_samples: int):
    """(dataset_index, dataset_sample_index): which dataset serves sample n, and which of its samples.

    A plain loop over Python floats: the rule is sequential by nature, and for a handful of datasets this
    runs about 1M samples per second, once; the result is cached on disk like the GPT indices. Datasets
    of weight 0 never take part (the rule alone could pick one on a tie of zero errors).
    """
    normalized = normalize_weights(weights)
    active = np.flatnonzero(normalized > 0)
    w = [float(normalized[d]) for d in active]
    counts = [0] * len(w)
    picks = bytearray(num_samples) if len(w) <= 256 else None
    picks_list = [] if picks is None else None
    others = range(1, len(w))
    w0 = w[0]
    for n in range(num_samples):
        t = n if n else 1  # Megatron-LM's max(n, 1)
        best, best_error = 0, w0 * t - counts[0]
        for d in others:
            error = w[d] * t - counts[d]
            if error > best_error:
                best, best_error = d, error
        counts[best] += 1
        if picks is not None:
            picks[n] = best
        else:
            picks_list.append(best)
    active_index = np.frombuffer(picks, dtype=np.uint8) if picks is not None else np.array(picks_list)
    dataset_index = active.astype(np.int16)[active_index]
    # The k-th time a dataset is picked it serves its sample k: a per-dataset running count.
    dataset_sample_index = np.zeros(num_samples, dtype=np.int64)
    for d in active:
        mask = dataset_index == d
        dataset_sample_index[mask] = np.arange(int(mask.sum()), dtype=np.int64)
    return dataset_index, dataset_sample_index


def samples_needed_per_dataset(weights: Sequence[float], num_samples: int):
    """An upper bound on how many samples the rule takes from each dataset: count < weight * n + 1."""
    return [int(math.ceil(w * num_samples)) + 1 for w in normalize_weights(weights)]


class BlendedDataset:
    """num_samples samples mixed from datasets by weight; item n is a sample of dataset dataset_index[n]."""

    def __init__(self, datasets: Sequence, weights: Sequence[float], num_samples: int,
                 cache_dir: Optional[str] = None, name: str = "train"):
        if len(datasets) != len(weights):
            raise DataError(f"{len(datasets)} datasets but {len(weights)} weights (data.data_path: weight, path, "
                            f"weight, path, ...)")
        if len(datasets) > np.iinfo(np.int16).max:
            raise DataError(f"too many datasets to blend ({len(datasets)}; at most {np.iinfo(np.int16).max}): "
                            f"merge some with tools/merge_datasets.py")
        self.datasets = list(datasets)
        self.weights = normalize_weights(weights)
        self.num_samples = int(num_samples)
        self.name = name
        description = {
            "class": "BlendedDataset",
            "weights": self.weights.tolist(),
            "num_samples": self.num_samples,
            "datasets": [getattr(ds, "description", repr(ds)) for ds in self.datasets],
        }
        arrays = build_or_load_arrays(cache_dir, f"blend_{name}", description, self._build)
        self.dataset_index = arrays["dataset_index"]
        self.dataset_sample_index = arrays["dataset_sample_index"]
        counts = np.bincount(self.dataset_index, minlength=len(self.datasets))
        for d, (ds, count) in enumerate(zip(self.datasets, counts)):
            if count > (0 if ds is None else len(ds)):
                raise DataError(f"{name}: blending needs {count} samples from dataset {d} ({ds!r}), "
                                f"which has only {0 if ds is None else len(ds)}")

    def _build(self):
        dataset_index, dataset_sample_index = build_blending_indices(self.weights, self.num_samples)
        return {"dataset_index": dataset_index, "dataset_sample_index": dataset_sample_index}

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, idx: int) -> np.ndarray:
        if not 0 <= idx < self.num_samples:
            raise IndexError(f"sample {idx} out of range for blended {self.name} dataset of {self.num_samples}")
        return self.datasets[int(self.dataset_index[idx])][int(self.dataset_sample_index[idx])]

    def __repr__(self):
        return f"BlendedDataset({self.name}, weights={self.weights.round(4).tolist()}, samples={self.num_samples})"
