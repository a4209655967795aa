"""Saving and resuming a training run: DeepSpeed's save/load plus what DeepSpeed does not keep, and the
completeness marker (collective calls: every rank of the job makes them).

    step_00000100/            DeepSpeed's files (model / layer / ZeRO optimizer states, client_state)
        rng_rank00003.pt      this rank's RNG states (DeepSpeed keeps client_state from DP rank 0 only)
        megaloop_complete.json  written by rank 0 AFTER a barrier that every rank reaches only once its
                                own files are written; holds the step, consumed samples and the checksum
                                of every file (integrity.py: hashed by all ranks in parallel)
    latest                    the newest complete tag (DeepSpeed's format: the tag as text)

DeepSpeed's own `latest` is written by rank 0 right after *its* files, with no barrier before it, so a
rank still writing (or dying) could leave `latest` naming an incomplete checkpoint: megaloop saves with
`save_latest=False` and writes `latest` itself, atomically (tmp + rename), after the barrier. Loading
trusts only tags with the completeness marker (layout.resolve): a checkpoint whose save was interrupted
is ignored and the previous complete one loads.

Weights that are not finite are never saved: save_training checks them first (one device reduction and
one all-reduce on the save step) and raises NonFiniteState, so no tag with NaN / inf weights is written,
marked complete, named by `latest` or counted by the rotation (which therefore never deletes the newest
finite checkpoint: every complete tag is finite).

A save is prepare_save (the finite check, before anything is written), the files, then finalize_save
(checksums, marker, `latest`, rotation): save_training runs them in a row; async_save.py writes the files
in a background thread and calls finalize_save once every rank's thread has finished.
"""
from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

import torch

from megaloop.checkpoint.layout import COMPLETE, LATEST, CheckpointError, atomic_write, complete_tags, tag_for, write_marker
from megaloop.errors import OutputError, os_error_in


def save_error(err: BaseException, root, tag_dir) -> OutputError:
    """The one-line error for a save that failed writing (disk full, read-only, ...): names the folder, and
    says which complete checkpoint is still intact (`latest` is only moved after a complete save), or that
    there is none. A RuntimeError from torch's zip writer ("file write failed") counts as a write error:
    ENOSPC when the folder's file system has under 1 GiB free."""
    err = os_error_in(err) or err
    if not isinstance(err, OSError):
        try:
            full = shutil.disk_usage(root).free < (1 << 30)
        except OSError:
            full = False
        err = OSError(errno.ENOSPC if full else errno.EIO,
                      "No space left on device" if full else f"write failed ({' '.join(str(err).split())[:160]})")
    try:
        previous = [d for d in complete_tags(root) if os.path.abspath(d) != os.path.abspath(tag_dir)]
    except OSError:
        previous = []
    left = (f"the previous checkpoint {previous[-1]} is intact and `latest` still names it"
            if previous else "no earlier complete checkpoint exists")
    return OutputError(err, root, f"checkpoint {tag_dir} is incomplete (it is never loaded; delete it to free "
                                  f"space); {left}")


class NonFiniteState(CheckpointError):
    """The weights about to be saved are not finite: nothing was written."""


def weights_finite(module) -> bool:
    """Collective (every rank): are all weights finite on every rank? Each rank reduces its own parameters
    (a ZeRO-3 rank its partition) to one flag on the device (max |w| per tensor: no overflow for large
    finite weights), the flags are all-reduced, and one value is read (on save steps only)."""
    import deepspeed.comm as dist
    from megaloop.parallel.device import zeros_on_accelerator
    tensors = [getattr(p, "ds_tensor", p).detach() for p in module.parameters()]
    tensors = [t for t in tensors if t.numel()]
    bad = zeros_on_accelerator(1)
    if tensors:
        amax = torch.stack([n.float().reshape(()) for n in torch._foreach_norm(tensors, ord=float("inf"))])
        bad = (~torch.isfinite(amax)).any().float().reshape(1).to(bad.device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    return not bool(bad.item())


def _is_write_failure(err: BaseException) -> bool:
    if os_error_in(err) is not None:
        return True
    text = str(err).lower()
    return isinstance(err, RuntimeError) and ("write failed" in text or "no space left" in text)


def _rng_file(tag_dir, rank: int) -> str:
    return os.path.join(tag_dir, f"rng_rank{rank:05d}.pt")


def rng_state() -> dict:
    from deepspeed.accelerator import get_accelerator
    import random
    import numpy as np
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    # numpy's key array as a tensor: the file then loads with torch.load(weights_only=True) (safe_load)
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss)}
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
    name, keys, *rest = state["numpy"]
    keys = keys.numpy() if torch.is_tensor(keys) else keys  # (files before the tensor form: a numpy array)
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), *rest))
    if "accelerator" in state:
        get_accelerator().set_rng_state(state["accelerator"])


def save_training(engine, root, step: int, client_state: dict, rank: int, keep: int = 0,
                  fault_hook=None) -> str:
    """Save on every rank (collective) under the checkpoint root `root`; `keep` > 0 deletes all but the
    newest `keep` complete tags. Returns the tag folder. Raises NonFiniteState (nothing written) when a
    weight is not finite on any rank. (async_save.py: the same save, written in the background and
    finalized later by finalize_save.)"""
    root = str(root)
    tag = tag_for(step)
    tag_dir = prepare_save(engine, root, step, rank)
    try:
        engine.save_checkpoint(root, tag=tag, client_state=client_state, save_latest=False)
        with open(_rng_file(tag_dir, rank), "wb") as f:  # a Python file: a full disk raises OSError
            torch.save(rng_state(), f)
        if fault_hook is not None:
            fault_hook(tag)  # tests: die or fail here, after the files and before the marker
    except Exception as e:
        raise write_error(e, root, tag_dir)
    return finalize_save(root, step, client_state.get("consumed_samples"), rank, keep)


def prepare_save(engine, root: str, step: int, rank: int) -> str:
    """What every save does before writing (collective): the weights must be finite on every rank (else
    NonFiniteState, nothing written; under async_save these are the weights the host copy then takes), and
    a tag saved again loses its marker first. Returns the tag folder."""
    tag_dir = os.path.join(str(root), tag_for(step))
    if getattr(engine, "module", None) is not None and not weights_finite(engine.module):
        raise NonFiniteState(f"the weights after step {step} are not finite: checkpoint {tag_dir} was not saved")
    if rank == 0 and os.path.exists(os.path.join(tag_dir, COMPLETE)):
        os.remove(os.path.join(tag_dir, COMPLETE))  # a tag saved again (after a fallback) is incomplete until done
    return tag_dir


def write_error(err: Exception, root, tag_dir) -> Exception:
    """The exception to raise for an error while writing a tag's files (save_error for a write failure)."""
    if _is_write_failure(err):
        out = save_error(err, root, tag_dir)
        out.__cause__ = err
        return out
    return err


def finalize_save(root, step: int, consumed_samples, rank: int, keep: int = 0) -> str:
    """Collective, once every rank has written all its files of step `step`'s tag: the completeness
    marker, then `latest`, then rotation (complete tags only: never the tag being written, and never the
    newest complete one, `keep` >= 1). The checksums are of the files as written (all ranks hash them,
    integrity.py). Returns the tag folder."""
    import deepspeed.comm as dist
    from megaloop.checkpoint.integrity import checksum_tag
    root = str(root)
    tag = tag_for(step)
    tag_dir = os.path.join(root, tag)
    dist.barrier()  # every rank has written everything it writes
    sums = checksum_tag(tag_dir, rank, dist.get_world_size())  # (collective; rank 0 gets them all)
    if rank == 0:
        try:
            write_marker(tag_dir, step, consumed_samples, sums)
            atomic_write(os.path.join(root, LATEST), tag)
        except OSError as e:
            raise save_error(e, root, tag_dir) from e
        if keep > 0:
            for old in complete_tags(root)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return tag_dir


def load_training(engine, tag_dir, rank: int) -> dict:
    """Load weights, optimizer, scheduler and this rank's RNG states from a (complete) tag folder, as
    layout.resolve returns it; returns the client state saved with it."""
    from megaloop.checkpoint.safe_load import check_folder

    tag_dir = Path(tag_dir)
    check_folder(tag_dir)  # DeepSpeed unpickles with weights_only=False: nothing in the folder may name a callable
    path, client_state = engine.load_checkpoint(str(tag_dir.parent), tag=tag_dir.name, load_optimizer_states=True,
                                                load_lr_scheduler_states=True)
    if path is None:
        raise CheckpointError(f"DeepSpeed could not load checkpoint {tag_dir}")
    load_rng(_rng_file(tag_dir, rank))
    return client_state or {}


def load_rng(rng_file) -> None:
    """Restore this rank's RNG states from its file in a tag folder, if there is one. A file that does not read
    (truncated, or not an RNG record) is refused naming it, instead of torch's unpickling traceback."""
    from megaloop.checkpoint.safe_load import load
    if not os.path.isfile(rng_file):
        return
    try:
        set_rng_state(load(rng_file))
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - zip / pickle / key errors: all mean a damaged file
        raise CheckpointError(f"checkpoint file {rng_file} is damaged or truncated ({' '.join(str(e).split())[:120]}); "
                              f"resume from an earlier complete checkpoint (--load its step folder) or delete this "
                              f"step folder") from None
