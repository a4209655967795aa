"""Checkpoints: DeepSpeed's save/load plus what DeepSpeed does not keep, and a completeness marker.

Layout under `<output_dir>/checkpoints/`:

    step_00000100/            DeepSpeed's files (model / layer / ZeRO optimizer states, client_state)
        rng_rank00003.pt      this rank's RNG states (DeepSpeed keeps client_state from DP rank 0 only)
        megaloop_complete.json  written by rank 0 AFTER a barrier that every rank reaches only once its
                                own files are written; holds the step and consumed samples
    latest                    the newest complete tag (DeepSpeed's format: the tag as text)

DeepSpeed's own `latest` is written by rank 0 right after *its* files, with no barrier before it, so a
rank still writing (or dying) could leave `latest` naming an incomplete checkpoint: megaloop saves with
`save_latest=False` and writes `latest` itself, atomically (tmp + rename), after the barrier. Loading
trusts only tags with the completeness marker: a checkpoint whose save was interrupted is ignored and
the previous complete one loads.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from typing import Optional, Tuple

import torch

COMPLETE = "megaloop_complete.json"
TAG_RE = re.compile(r"^step_(\d+)$")


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def _atomic_write(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def is_complete(root: str, tag: str) -> bool:
    return os.path.isfile(os.path.join(root, tag, COMPLETE))


def complete_tags(root: str) -> list:
    if not os.path.isdir(root):
        return []
    tags = [d for d in os.listdir(root) if TAG_RE.match(d) and is_complete(root, d)]
    return sorted(tags, key=lambda d: int(TAG_RE.match(d).group(1)))


def find_checkpoint(path: str) -> Optional[Tuple[str, str]]:
    """(root, tag) of the checkpoint to resume from, or None.

    `path` is a checkpoint root (uses `latest` when it names a complete tag, else the newest complete
    tag) or one tag directory (must be complete)."""
    if not path or not os.path.exists(path):
        return None
    path = os.path.abspath(path)
    if os.path.isfile(os.path.join(path, COMPLETE)):
        return os.path.dirname(path), os.path.basename(path)
    if TAG_RE.match(os.path.basename(path)):
        raise FileNotFoundError(f"checkpoint {path} is incomplete (no {COMPLETE}): its save was interrupted; "
                                f"load its parent directory to use the newest complete checkpoint")
    latest = os.path.join(path, "latest")
    if os.path.isfile(latest):
        tag = open(latest).read().strip()
        if is_complete(path, tag):
            return path, tag
    tags = complete_tags(path)
    return (path, tags[-1]) if tags else None


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


def save(engine, root: str, step: int, client_state: dict, rank: int, keep: int = 0,
         fault_hook=None) -> str:
    """Save on every rank (collective). Returns the tag."""
    import deepspeed.comm as dist
    tag = tag_for(step)
    engine.save_checkpoint(root, tag=tag, client_state=client_state, save_latest=False)
    torch.save(rng_state(), os.path.join(root, tag, f"rng_rank{rank:05d}.pt"))
    if fault_hook is not None:
        fault_hook(tag)  # tests: die here, after the files and before the marker
    dist.barrier()  # every rank has written everything it writes
    if rank == 0:
        _atomic_write(os.path.join(root, tag, COMPLETE),
                      json.dumps({"step": step, "consumed_samples": client_state.get("consumed_samples")}))
        _atomic_write(os.path.join(root, "latest"), tag)
        if keep > 0:
            for old in complete_tags(root)[:-keep]:
                shutil.rmtree(os.path.join(root, old), ignore_errors=True)
    dist.barrier()
    return tag


def load(engine, root: str, tag: str, rank: int) -> dict:
    path, client_state = engine.load_checkpoint(root, tag=tag, load_optimizer_states=True,
                                                load_lr_scheduler_states=True)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {os.path.join(root, tag)}")
    rng_file = os.path.join(root, tag, f"rng_rank{rank:05d}.pt")
    if os.path.isfile(rng_file):
        set_rng_state(torch.load(rng_file, weights_only=False))
    return client_state or {}
