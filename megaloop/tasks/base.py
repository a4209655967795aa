"""The interface every synthetic task implements, the dataset and loader over it, and exact-match accuracy.

A task is a pure function of (seed, index): `task.example(index)` -> (tokens, labels), two int64 tensors of
length `task.seq_len`, drawn from a numpy Generator seeded with (seed, a per-task salt, index) and nothing
else. Any data-parallel rank, loader worker, pipeline stage or resumed run that asks for index i gets the
same example, whatever the TP / PP / DP layout, so sharding and resuming reuse the pretraining sampler
(megaloop.data.sampler.PretrainingSampler: each global micro batch of micro_batch_size * dp_size
consecutive indices is cut into one slice per rank; a run resumed with consumed_samples = N reads what an
uninterrupted run would have read next).

Labels are aligned with the model's outputs, not shifted: labels[t] is the target of the logits at
position t (a causal model answers from tokens[:t + 1]), and IGNORE_INDEX (-100) everywhere outside the
answer positions. Token 0 is padding in every task's vocabulary (never emitted by the generators here; kept
free for batching examples of different lengths).

TaskDataset(task, num_samples)[i] is one int64 array [2, seq_len] (row 0 the tokens, row 1 the labels), so
the existing collate_samples / data_loader stack micro-batches to [B, 2, seq_len]; task_inputs_and_labels
splits such a batch into (tokens, labels) the way inputs_and_labels does for [B, seq_len + 1] text batches.
"""
from __future__ import annotations

import zlib
from typing import Tuple

import numpy as np
import torch

IGNORE_INDEX = -100
PAD = 0


class Task:
    """Base class: subclasses set `name`, `vocab_size`, `seq_len` and implement `_generate(rng)` returning
    (tokens, labels) as int64 numpy arrays of length seq_len."""

    name = "task"
    vocab_size: int
    seq_len: int
    # True when an answer also appears later in the tokens (teacher forcing): a bidirectional model
    # (model.causal=false) would read it there, so the trainer refuses that combination.
    answers_in_tokens = False

    def __init__(self, seed: int = 0):
        if int(seed) < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.seed = int(seed)

    def params(self) -> dict:
        """The task's parameters (what build_task(self.name, **params) rebuilds it from)."""
        raise NotImplementedError

    def _salt(self) -> int:
        # Different tasks (or the same task with other parameters) under one seed draw unrelated streams.
        return zlib.crc32(repr((self.name, sorted(self.params().items()))).encode())

    def rng(self, index: int) -> np.random.Generator:
        if int(index) < 0:
            raise IndexError(f"example index must be >= 0, got {index}")
        return np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, self._salt(), int(index)])))

    def _generate(self, rng: np.random.Generator) -> Tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def example_arrays(self, index: int) -> Tuple[np.ndarray, np.ndarray]:
        tokens, labels = self._generate(self.rng(index))
        tokens, labels = np.asarray(tokens, dtype=np.int64), np.asarray(labels, dtype=np.int64)
        assert tokens.shape == labels.shape == (self.seq_len,), (tokens.shape, labels.shape, self.seq_len)
        return tokens, labels

    def example(self, index: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """(tokens, labels): LongTensor[seq_len] each, a pure function of (seed, parameters, index)."""
        tokens, labels = self.example_arrays(index)
        return torch.from_numpy(tokens), torch.from_numpy(labels)

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.params().items())
        return f"{type(self).__name__}({args}, seed={self.seed})"


class TaskDataset:
    """`num_samples` examples of `task` starting at example index `offset`: item i is task example
    offset + i as an int64 array [2, seq_len] (tokens, labels). A map-style dataset for the sampler."""

    def __init__(self, task: Task, num_samples: int, offset: int = 0):
        if num_samples <= 0:
            raise ValueError(f"num_samples must be positive, got {num_samples}")
        if offset < 0:
            raise ValueError(f"offset must be >= 0, got {offset}")
        self.task, self.num_samples, self.offset = task, int(num_samples), int(offset)

    @property
    def seq_len(self) -> int:
        return self.task.seq_len

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, i: int) -> np.ndarray:
        i = int(i)
        if not 0 <= i < self.num_samples:
            raise IndexError(f"index {i} is outside [0, {self.num_samples})")
        return np.stack(self.task.example_arrays(self.offset + i))


def build_task_loader(dataset: TaskDataset, consumed_samples: int, micro_batch_size: int, dp_rank: int,
                      dp_size: int, num_workers: int = 0, drop_last: bool = True):
    """megaloop.data.build_data_loader over a TaskDataset: this rank's [micro_batch_size, 2, seq_len]
    batches (PretrainingSampler's slices), resuming after consumed_samples."""
    from megaloop.data.sampler import build_data_loader
    return build_data_loader(dataset, consumed_samples, micro_batch_size, dp_rank, dp_size,
                             num_workers=num_workers, drop_last=drop_last)


def task_inputs_and_labels(batch: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(tokens, labels) [B, seq_len] each from a collated [B, 2, seq_len] task batch; contiguous and, on
    accelerator machines, page-locked like megaloop.data.sampler.inputs_and_labels."""
    if batch.dim() != 3 or batch.shape[1] != 2:
        raise ValueError(f"a task batch is [B, 2, seq_len], got {tuple(batch.shape)}")
    from deepspeed.accelerator import get_accelerator
    acc = get_accelerator()
    pieces = batch[:, 0].contiguous(), batch[:, 1].contiguous()
    return pieces if acc.device_name() == "cpu" else tuple(acc.pin_memory(t) for t in pieces)


def exact_match_counts(logits_or_preds: torch.Tensor, labels: torch.Tensor) -> Tuple[int, int, int, int]:
    """(sequences all right, sequences with an answer, answer positions right, answer positions).

    logits_or_preds: logits [..., T, V] (argmax taken) or predicted ids with labels' shape [..., T].
    Answer positions are those with labels != IGNORE_INDEX (any negative label is ignored, as in the
    loss); a sequence without one is not counted. Counts (not ratios) so ranks can sum them."""
    labels = torch.as_tensor(labels)
    preds = torch.as_tensor(logits_or_preds)
    if preds.dim() == labels.dim() + 1:
        preds = preds.argmax(dim=-1)
    if preds.shape != labels.shape:
        raise ValueError(f"predictions {tuple(preds.shape)} do not match labels {tuple(labels.shape)}")
    if labels.dim() == 1:
        preds, labels = preds.unsqueeze(0), labels.unsqueeze(0)
    preds, labels = preds.reshape(-1, labels.shape[-1]), labels.reshape(-1, labels.shape[-1])
    answer = labels >= 0
    right = (preds.to(labels.device) == labels) & answer
    has_answer = answer.any(dim=-1)
    seq_right = (right.sum(-1) == answer.sum(-1)) & has_answer
    return int(seq_right.sum()), int(has_answer.sum()), int(right.sum()), int(answer.sum())


def exact_match(logits_or_preds: torch.Tensor, labels: torch.Tensor) -> Tuple[float, float]:
    """(per_sequence, per_position) exact-match accuracy over the answer positions (labels >= 0):
    the fraction of sequences whose every answer is right, and the fraction of answer positions right.
    NaN where there is no answer position at all."""
    sr, sn, pr, pn = exact_match_counts(logits_or_preds, labels)
    return (sr / sn if sn else float("nan")), (pr / pn if pn else float("nan"))
