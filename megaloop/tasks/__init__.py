"""Synthetic tasks for looped models: generated on the fly, deterministic from a seed, no downloads.

    task = build_task("parity", length=64, seed=1)          # or "prefix_sum", "mqar", "s5", "sudoku", ...
    tokens, labels = task.example(index)                     # LongTensor[task.seq_len] each
    dataset = TaskDataset(task, num_samples)                 # item i: int64 [2, seq_len] (tokens; labels)
    loader = build_task_loader(dataset, consumed_samples, micro_batch_size, dp_rank, dp_size)
    tokens, labels = task_inputs_and_labels(next(iter(loader)))
    per_sequence, per_position = exact_match(logits, labels)

Every example is a pure function of (seed, task parameters, index) (megaloop/tasks/base.py), so sharding
and resuming follow the pretraining sampler's index order on any TP / PP / DP layout. Labels are aligned
with the logits (no shift) and -100 outside the answer positions. Each module's docstring gives its
vocabulary and layout:

    prefix_sum.py      prefix parity / prefix sums mod m ("parity", "prefix_sum"); length is a parameter
    mqar.py            multi-query associative recall ("mqar")
    state_tracking.py  group word problems ("state_tracking", group=S5 / A5 / Z5 / Z60 / ...; "s5", ...)
    sudoku.py          4x4 / 9x9 sudoku with a unique solution ("sudoku", size=4 or 9)
"""
from __future__ import annotations

import inspect

from megaloop.tasks.base import (IGNORE_INDEX, PAD, Task, TaskDataset, build_task_loader, exact_match,
                                 exact_match_counts, task_inputs_and_labels)
from megaloop.tasks.mqar import MQARTask
from megaloop.tasks.prefix_sum import PrefixSumTask
from megaloop.tasks.state_tracking import StateTrackingTask
from megaloop.tasks.sudoku import SudokuTask

__all__ = ["IGNORE_INDEX", "PAD", "TASKS", "MQARTask", "PrefixSumTask", "StateTrackingTask", "SudokuTask",
           "Task", "TaskDataset", "build_task", "build_task_loader", "exact_match", "exact_match_counts",
           "task_inputs_and_labels"]

# name -> (class, fixed parameters)
TASKS = {
    "prefix_sum": (PrefixSumTask, {}),
    "parity": (PrefixSumTask, {"modulus": 2}),
    "mqar": (MQARTask, {}),
    "state_tracking": (StateTrackingTask, {}),
    "s5": (StateTrackingTask, {"group": "S5"}),
    "a5": (StateTrackingTask, {"group": "A5"}),
    "z5": (StateTrackingTask, {"group": "Z5"}),
    "z60": (StateTrackingTask, {"group": "Z60"}),
    "sudoku": (SudokuTask, {}),
}


def build_task(name: str, **params) -> Task:
    """The task registered as `name` with `params` (its class's keyword arguments, seed included)."""
    key = str(name).lower()
    if key not in TASKS:
        raise ValueError(f"unknown task {name!r}; known: {', '.join(sorted(TASKS))}")
    cls, fixed = TASKS[key]
    clash = sorted(set(params) & set(fixed))
    if clash:
        raise ValueError(f"task {key!r} fixes {', '.join(f'{k}={fixed[k]!r}' for k in clash)}; "
                         f"use {cls.name!r} to choose it")
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self"}
    unknown = sorted(set(params) - accepted)
    if unknown:
        raise ValueError(f"task {key!r} has no parameter {', '.join(unknown)}; it takes "
                         f"{', '.join(sorted(accepted - set(fixed)))}")
    return cls(**fixed, **params)
