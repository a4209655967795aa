"""Which samples each data-parallel rank reads, resumable after any number of consumed samples.

Global sample order is 0, 1, 2, ... (the datasets already shuffle). Each step's global micro batch of
micro_batch_size * dp_size consecutive indices is cut into one slice per rank, as Megatron-LM's
MegatronPretrainingSampler does. A run restarted with consumed_samples = N (all ranks together) reads
exactly the samples an uninterrupted run would have read next.
"""
from typing import Iterator, List

import numpy as np


class PretrainingSampler:
    """A batch sampler: yields this rank's list of sample indices for each micro batch."""

    def __init__(self, total_samples: int, consumed_samples: int, micro_batch_size: int,
                 dp_rank: int, dp_size: int, drop_last: bool = True):
        if total_samples <= 0:
            raise ValueError(f"no samples to draw from (total_samples={total_samples})")
        if not 0 <= consumed_samples <= total_samples:
            raise ValueError(f"consumed_samples {consumed_samples} is outside [0, {total_samples}]: the run has "
                             f"used up its dataset; build it with more samples to keep training")
        if micro_batch_size <= 0:
            raise ValueError(f"micro_batch_size must be positive, got {micro_batch_size}")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} is outside [0, {dp_size})")
        self.total_samples = total_samples
        self.consumed_samples = consumed_samples
        self.micro_batch_size = micro_batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.drop_last = drop_last

    @property
    def global_micro_batch(self) -> int:
        return self.micro_batch_size * self.dp_size

    def __len__(self) -> int:
        remaining = self.total_samples - self.consumed_samples
        full, partial = divmod(remaining, self.global_micro_batch)
        return full + (1 if partial and not self.drop_last and self._partial_slice(partial) else 0)

    def _partial_slice(self, partial: int) -> List[int]:
        # A last partial batch is shared equally so every rank runs the same number of steps; the
        # remainder of partial / dp_size samples is dropped (Megatron-LM would hand out uneven slices).
        share = partial // self.dp_size
        start = self.total_samples - partial + self.dp_rank * share
        return list(range(start, start + share))

    def __iter__(self) -> Iterator[List[int]]:
        offset = self.dp_rank * self.micro_batch_size
        last_full = self.total_samples - self.global_micro_batch
        for start in range(self.consumed_samples, last_full + 1, self.global_micro_batch):
            yield list(range(start + offset, start + offset + self.micro_batch_size))
        partial = (self.total_samples - self.consumed_samples) % self.global_micro_batch
        if partial and not self.drop_last:
            batch = self._partial_slice(partial)
            if batch:
                yield batch


def collate_samples(samples) -> "torch.Tensor":  # noqa: F821
    """[micro_batch, seq_len + 1] int64 tensor from numpy samples."""
    import torch

    return torch.from_numpy(np.stack(samples))


def build_data_loader(dataset, consumed_samples: int, micro_batch_size: int, dp_rank: int, dp_size: int,
                      num_workers: int = 2, drop_last: bool = True):
    """A torch DataLoader over dataset for one data-parallel rank, resuming after consumed_samples."""
    import torch
    from deepspeed.accelerator import get_accelerator

    sampler = PretrainingSampler(len(dataset), consumed_samples, micro_batch_size, dp_rank, dp_size, drop_last)
    pin = get_accelerator().device_name() != "cpu"  # pinned host memory only helps copies to a device
    return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers,
                                       collate_fn=collate_samples, pin_memory=pin,
                                       persistent_workers=num_workers > 0)
