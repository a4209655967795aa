"""Which samples each data-parallel rank reads, resumable after any number of consumed samples, and the
loader that reads them.

Global sample order is 0, 1, 2, ... (the datasets already shuffle). Each step's global micro batch of
micro_batch_size * dp_size consecutive indices is cut into one slice per rank, as Megatron-LM's
MegatronPretrainingSampler does. A run restarted with consumed_samples = N (all ranks together) reads
exactly the samples an uninterrupted run would have read next.

build_data_loader is the one read path: a torch DataLoader over PretrainingSampler whose collate function
is collate_samples, with `num_workers` worker processes reading ahead (0: read in the calling process).
The trainer's TrainBatches / EvalBatches (megaloop/training/data.py) wrap it: they split each micro-batch
into inputs and labels with inputs_and_labels (page-locked on accelerator machines) and attach the loop
counts in the main process.
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
    """[micro_batch, seq_len + 1] int64 tensor from a micro-batch's samples (arrays of token ids)."""
    import torch

    return torch.from_numpy(np.stack([np.asarray(s, dtype=np.int64) for s in samples]))


def data_loader(dataset, batch_sampler, num_workers: int = 0):
    """A torch DataLoader yielding collate_samples of each index list of batch_sampler (in its order).

    num_workers > 0: that many worker processes read ahead (two micro-batches each) and stay alive for
    the loader's life; the order of the batches is the sampler's whatever the number of workers. Batches
    come back in pageable memory: inputs_and_labels page-locks the pieces the trainer copies to the device.
    """
    import torch

    return torch.utils.data.DataLoader(dataset, batch_sampler=batch_sampler, num_workers=num_workers,
                                       collate_fn=collate_samples, persistent_workers=num_workers > 0)


def build_data_loader(dataset, consumed_samples: int, micro_batch_size: int, dp_rank: int, dp_size: int,
                      num_workers: int = 0, drop_last: bool = True):
    """A torch DataLoader over dataset for one data-parallel rank, resuming after consumed_samples: it
    yields [micro_batch_size, seq_len + 1] int64 tensors, this rank's slice of each global micro batch."""
    sampler = PretrainingSampler(len(dataset), consumed_samples, micro_batch_size, dp_rank, dp_size, drop_last)
    return data_loader(dataset, sampler, num_workers)


def inputs_and_labels(sample: "torch.Tensor"):  # noqa: F821
    """(tokens, labels) of a [micro_batch, seq_len + 1] batch: sample[:, :-1] and sample[:, 1:], each
    contiguous and, on accelerator machines, page-locked (deepspeed's accelerator pin_memory), so that the
    trainer's copy to the device is asynchronous (a copy from pageable memory waits for the device's queued
    work: a host sync every step)."""
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    pieces = sample[:, :-1].contiguous(), sample[:, 1:].contiguous()
    return pieces if acc.device_name() == "cpu" else tuple(acc.pin_memory(t) for t in pieces)
