"""Saving and resuming a training run: DeepSpeed's save/load plus what DeepSpeed does not keep, and the
completeness marker (collective calls: every rank of the job makes them).

    step_00000100/            DeepSpeed's files (model / layer / ZeRO optimizer states, client_state)
        rng_rank00003.pt      this rank's RNG states (DeepSpeed keeps client_state from DP rank 0 only)
        megaloop_complete.json  written by rank 0 AFTER a barrier that every rank reaches only once its
                                own files are written; holds the step and consumed samples
    latest                    the newest complete tag (DeepSpeed's format: the tag as text)

DeepSpeed's own `latest` is written by rank 0 right after *its* files, with no barrier before it, so a
rank still writing (or dying) could leave `latest` naming an incomplete checkpoint: megaloop saves with
`save_latest=False` and writes `latest` itself, atomically (tmp + rename), after the barrier. Loading
trusts only tags with the completeness marker (layout.resolve): a checkpoint whose save was interrupted
is ignored and the previous complete one loads.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from megaloop.checkpoint.layout import LATEST, CheckpointError, atomic_write, complete_tags, tag_for, write_marker


def _rng_file(tag_dir, rank: int) -> str:
    return os.path.join(tag_dir, f"rng_rank{rank:05d}.pt")


def rng_state() -> dict:
    from deepspeed.accelerator import get_accelerator
    import random
    import numpy as np
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    acc = get_accelerator()
    if acc.device_name() != "cpu":
        state["accelerator"] = acc.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    from deepspeed.accelerator import get_accelerator
    import random
    import numpy as np
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "accelerator" in state:
        get_accelerator().set_rng_state(state["accelerator"])


def save_training(engine, root, step: int, client_state: dict, rank: int, keep: int = 0,
                  fault_hook=None) -> str:
    """Save on every rank (collective) under the checkpoint root `root`; `keep` > 0 deletes all but the
    newest `keep` complete tags. Returns the tag folder."""
    import deepspeed.comm as dist
    root = str(root)
    tag = tag_for(step)
    tag_dir = os.path.join(root, tag)
    engine.save_checkpoint(root, tag=tag, client_state=client_state, save_latest=False)
    torch.save(rng_state(), _rng_file(tag_dir, rank))
    if fault_hook is not None:
        fault_hook(tag)  # tests: die here, after the files and before the marker
    dist.barrier()  # every rank has written everything it writes
    if rank == 0:
        write_marker(tag_dir, step, client_state.get("consumed_samples"))
        atomic_write(os.path.join(root, LATEST), tag)
        if keep > 0:
            for old in complete_tags(root)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return tag_dir


def load_training(engine, tag_dir, rank: int) -> dict:
    """Load weights, optimizer, scheduler and this rank's RNG states from a (complete) tag folder, as
    layout.resolve returns it; returns the client state saved with it."""
    tag_dir = Path(tag_dir)
    path, client_state = engine.load_checkpoint(str(tag_dir.parent), tag=tag_dir.name, load_optimizer_states=True,
                                                load_lr_scheduler_states=True)
    if path is None:
        raise CheckpointError(f"DeepSpeed could not load checkpoint {tag_dir}")
    rng_file = _rng_file(tag_dir, rank)
    if os.path.isfile(rng_file):
        set_rng_state(torch.load(rng_file, weights_only=False))
    return client_state or {}
