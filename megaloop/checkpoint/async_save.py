"""Asynchronous checkpoint saves (`train.async_save: true`): training continues while the files are written.

How: for the save, DeepSpeed's engine gets a `SnapshotEngine` as its checkpoint engine. DeepSpeed builds
its state dicts and file names exactly as in a synchronous save (same files, same layout, same bytes), and
`SnapshotEngine.save` copies each state dict to host memory (one device -> host copy per tensor, the only
part of the save the training step waits for) instead of writing it. A background thread then writes the
copies (and this rank's RNG file) with torch.save while the next steps run.

Why not the alternatives: DeepSpeed 0.19's decoupled / fast checkpoint engines need its async-I/O op
(absent on CPU and on many clusters) and commit with their own `latest`; torch.distributed.checkpoint's
async_save writes its own format, which megaloop's reader, relayout, export and init.from do not read.

The guarantees of engine.save_training hold: nothing marks the tag complete until every rank's thread has
finished (`poll` agrees on that with one all-reduce on the device on the trainer's settle steps, bounded by
train.dist_timeout like every collective); then `finalize_save` runs on the main thread exactly as after a
synchronous save (barrier, marker, `latest`, rotation), so a crash during the write leaves the previous
`latest`, and rotation (complete tags only) never touches the tag being written. A new save, the run's end
and a stop signal first wait for the pending write. One write is pending at most.
"""
from __future__ import annotations

import copy
import os
import threading
import time
from typing import Callable, List, Optional, Tuple

import torch
from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine


def host_copy(obj, memo=None):
    """A copy of a (nested) state dict whose tensors are host copies: later training steps cannot change it."""
    memo = {} if memo is None else memo
    if isinstance(obj, torch.Tensor):
        if id(obj) not in memo:  # the same tensor twice stays one tensor (as torch.save would store it)
            memo[id(obj)] = obj.detach().to("cpu", copy=True)
        return memo[id(obj)]
    if isinstance(obj, dict):
        out = type(obj)() if type(obj) is not dict else {}
        for k, v in obj.items():
            out[k] = host_copy(v, memo)
        return out
    if isinstance(obj, (list, tuple)) and type(obj) in (list, tuple):
        return type(obj)(host_copy(v, memo) for v in obj)
    try:
        return copy.deepcopy(obj)  # (a loss scaler, a scheduler's state: objects a later step may change)
    except Exception:
        return obj


class SnapshotEngine(TorchCheckpointEngine):
    """DeepSpeed checkpoint engine that records (host copy, path) instead of writing: the writer thread
    writes them with the serialization setting of the engine it stands in for."""

    def __init__(self, replaced):
        super().__init__(None)
        self.zipfile_serialization = getattr(replaced, "zipfile_serialization", False)
        self.items: List[Tuple[object, str, bool]] = []

    def save(self, state_dict, path: str):
        self.items.append((host_copy(state_dict), path, self.zipfile_serialization))

    def preserves_storage_sharing(self):
        return False  # host_copy already copies each tensor on its own (what DeepSpeed's clone is for)


class PendingWrite:
    """One rank's background write of a tag's files."""

    def __init__(self, tag_dir: str, step: int, consumed, items, before: Optional[Callable] = None,
                 after: Optional[Callable] = None):
        self.tag_dir, self.step, self.consumed, self.items = tag_dir, step, consumed, items
        self.before, self.after = before, after  # test faults: slow the writer / die after the files
        self.error: Optional[BaseException] = None
        self.started = time.time()
        self.finished: Optional[float] = None
        self.thread = threading.Thread(target=self._write, name=f"megaloop-save-{step}", daemon=True)
        self.thread.start()

    def _write(self):
        try:
            if self.before is not None:
                self.before()
            while self.items:
                state, path, zipfile = self.items.pop(0)  # (each copy is freed once written)
                os.makedirs(os.path.dirname(path), exist_ok=True)
                with open(path, "wb") as f:  # a Python file: a full disk raises OSError
                    torch.save(state, f, _use_new_zipfile_serialization=zipfile)
                del state
            if self.after is not None:
                self.after(os.path.basename(self.tag_dir))
        except BaseException as e:  # reported on the main thread by poll / wait
            self.error = e
        finally:
            self.finished = time.time()

    def done(self) -> bool:
        return not self.thread.is_alive()

    def join(self, timeout_s: float) -> bool:
        self.thread.join(timeout_s)
        return self.done()


def snapshot(engine, root: str, tag: str, client_state: dict, rng: dict, rng_path: str) -> list:
    """Run DeepSpeed's save with a SnapshotEngine (collective, like engine.save_checkpoint): returns the
    (host copy, path, zip serialization) list this rank must write, its RNG file included."""
    replaced = engine.checkpoint_engine
    snap = SnapshotEngine(replaced)
    engine.checkpoint_engine = snap
    try:
        engine.save_checkpoint(root, tag=tag, client_state=client_state, save_latest=False)
    finally:
        engine.checkpoint_engine = replaced
    return snap.items + [(host_copy(rng), rng_path, True)]  # (torch.save's default, as the synchronous save)


class CheckpointSaver:
    """The trainer's saves: synchronous (engine.save_training) or, with async_write, written in the background.

    save / poll / wait are collective: every rank calls them at the same steps (save steps, the trainer's
    settle steps, the end / a stop). Each returns the tag folder that became complete in that call, or None;
    `last_good` is the newest complete one (set by the trainer on a resume)."""

    def __init__(self, engine, root: str, rank: int, train_cfg, console: Callable[[str], None] = print):
        self.engine, self.root, self.rank, self.console = engine, str(root), rank, console
        self.async_write, self.timeout_s = train_cfg.async_save, train_cfg.dist_timeout
        self.keep = train_cfg.keep_checkpoints
        self.last_good: Optional[str] = None
        self.pending: Optional[PendingWrite] = None
        self.history: List[dict] = []  # per async save: step, and the trainer step at which it became complete

    def save(self, step: int, client_state: dict, wait: bool = False, fault_hook=None,
             slow_hook=None) -> Optional[str]:
        from megaloop.checkpoint.engine import _rng_file, prepare_save, rng_state, save_training, write_error
        done = self.wait(step)  # (one write pending at most)
        if not self.async_write:
            return self._complete(save_training(self.engine, self.root, step, client_state, self.rank, self.keep,
                                                fault_hook))
        tag_dir = prepare_save(self.engine, self.root, step, self.rank)
        try:
            items = snapshot(self.engine, self.root, os.path.basename(tag_dir), client_state, rng_state(),
                             _rng_file(tag_dir, self.rank))
        except Exception as e:
            raise write_error(e, self.root, tag_dir)
        self.pending = PendingWrite(tag_dir, step, client_state.get("consumed_samples"), items, slow_hook, fault_hook)
        self.history.append({"step": step, "complete_at": None})
        return self.wait(step) if wait else done

    def poll(self, step: int) -> Optional[str]:
        """On a settle step: finalize the pending write if every rank's thread has finished (else nothing)."""
        if self.pending is None:
            return None
        return self._finish(step) if self._agreed_done() else None

    def wait(self, step: int) -> Optional[str]:
        """Wait (at most train.dist_timeout) for the pending write on this rank, then finalize it."""
        if self.pending is None:
            return None
        self.pending.join(self.timeout_s)
        if not self._agreed_done():
            from megaloop.checkpoint.layout import CheckpointError
            raise CheckpointError(f"checkpoint {self.pending.tag_dir}: its write did not finish within "
                                  f"train.dist_timeout={self.timeout_s:g} s on some rank (a hung file system?); "
                                  f"`latest` still names the previous checkpoint")
        return self._finish(step)

    def _agreed_done(self) -> bool:
        """Collective: has every rank's thread finished? (one all-reduce of one flag, on the device)"""
        import deepspeed.comm as dist
        from megaloop.parallel.device import on_accelerator
        flag = on_accelerator(0.0 if self.pending.done() else 1.0)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return float(flag.item()) == 0.0

    def _finish(self, step: int) -> str:
        import deepspeed.comm as dist
        from megaloop.checkpoint.engine import finalize_save, write_error
        from megaloop.checkpoint.layout import CheckpointError
        from megaloop.parallel.device import on_accelerator
        p, self.pending = self.pending, None
        failed = on_accelerator(0.0 if p.error is None else 1.0)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(failed, op=dist.ReduceOp.MAX)
        if p.error is not None:
            raise write_error(p.error, self.root, p.tag_dir) if isinstance(p.error, Exception) else p.error
        if float(failed.item()) > 0:
            raise CheckpointError(f"checkpoint {p.tag_dir}: another rank failed writing its files (its error is "
                                  f"above); `latest` still names the previous checkpoint")
        tag_dir = finalize_save(self.root, p.step, p.consumed, self.rank, self.keep)
        self.history[-1]["complete_at"] = step
        return self._complete(tag_dir)

    def _complete(self, tag_dir: str) -> str:
        self.last_good = tag_dir
        self.console(f"saved checkpoint {tag_dir}")
        return tag_dir
