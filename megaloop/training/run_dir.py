"""One run per output folder: an exclusive lock held for the run's lifetime, and the config history.

`RunDirLock` is an advisory `flock` on `<output_dir>/.megaloop.lock`, taken by global rank 0. The kernel
releases it when the process dies, so a crashed run never blocks the next one; the file also records the
holder (pid, host, start time), which names the run in the refusal and, after a crash, in the note that
its stale record was replaced. Where `flock` is unavailable (some network filesystems), the record
itself is the lock: a live pid on this host keeps it, a dead one is replaced with a note, and a record
from another host is refused (delete the file if that run is known to be gone).
"""
from __future__ import annotations

import errno
import json
import os
import socket
import time
from typing import Optional

from megaloop.config import ConfigError, save_config
from megaloop.tempfiles import pid_alive

LOCK_NAME = ".megaloop.lock"


class RunDirBusy(ConfigError):
    """Another run holds the output folder."""


class RunDirLock:
    def __init__(self, out_dir: str):
        self.path = os.path.join(out_dir, LOCK_NAME)
        self.fd: Optional[int] = None
        self.note: Optional[str] = None  # set when a stale record from a dead run was replaced

    def _describe(self, rec: dict) -> str:
        return f"pid {rec.get('pid')} on {rec.get('host')} (since {rec.get('started', '?')})"

    def _read(self) -> dict:
        try:
            with open(self.path) as f:
                return json.loads(f.read() or "{}")
        except (OSError, ValueError):
            return {}

    def acquire(self) -> None:
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        previous = self._read()
        try:
            import fcntl
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise RunDirBusy(f"output folder {os.path.dirname(self.path)} is in use by another run "
                                 f"({self._describe(previous)}); wait for it, stop it, or choose another "
                                 f"train.output_dir") from None
            self._acquire_by_record(previous)  # no flock here (ENOLCK, EOPNOTSUPP): the record is the lock
            return
        except ImportError:  # (no fcntl: not POSIX)
            os.close(fd)
            self._acquire_by_record(previous)
            return
        if previous.get("pid"):
            self.note = (f"replaced the lock record of a run that ended without releasing it "
                         f"({self._describe(previous)})")
        self.fd = fd
        self._write(fd)

    def _acquire_by_record(self, previous: dict) -> None:
        pid, host = previous.get("pid"), previous.get("host")
        if pid:
            if host != socket.gethostname():
                raise RunDirBusy(f"output folder {os.path.dirname(self.path)} is locked by {self._describe(previous)}; "
                                 f"if that run is gone, delete {self.path}")
            if pid_alive(int(pid)) and int(pid) != os.getpid():
                raise RunDirBusy(f"output folder {os.path.dirname(self.path)} is in use by another run "
                                 f"({self._describe(previous)}); wait for it, stop it, or choose another "
                                 f"train.output_dir")
            self.note = f"replaced the lock record of a run that is no longer alive ({self._describe(previous)})"
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        self._write(fd)
        self.fd = fd

    def _write(self, fd: int) -> None:
        rec = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(rec).encode(), 0)
        os.fsync(fd)

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            os.ftruncate(self.fd, 0)  # a clean end leaves no record behind
        finally:
            os.close(self.fd)  # (closing drops the flock)
            self.fd = None


def lock_output_dir(out_dir: str, rank: int) -> Optional[RunDirLock]:
    """Collective: rank 0 takes the output folder's lock (returned there; None elsewhere), and every rank
    raises RunDirBusy if it could not."""
    import deepspeed.comm as dist
    from megaloop.parallel.device import on_accelerator
    lock, err = None, None
    if rank == 0:
        try:
            lock = RunDirLock(out_dir)
            lock.acquire()
        except RunDirBusy as exc:
            lock, err = None, exc
    busy = on_accelerator(1.0 if err is not None else 0.0)
    dist.all_reduce(busy, op=dist.ReduceOp.MAX)
    if float(busy) > 0:
        raise err or RunDirBusy(f"output folder {out_dir} is in use by another run")
    return lock


def write_run_config(cfg, out_dir: str, rank: int, resumed_step=None) -> None:
    """The run's config.yaml (written once a resume's load has succeeded, never before) and, for a resume,
    config.<step>.yaml: the history of what each start of the run was given."""
    if rank != 0:
        return
    save_config(cfg, os.path.join(out_dir, "config.yaml"))
    if resumed_step is not None:
        save_config(cfg, os.path.join(out_dir, f"config.{int(resumed_step)}.yaml"))


STATUS_NAME = "run_status.json"


def write_run_status(out_dir: str, rank: int, status: str, step: int, exit_code: int) -> None:
    """`<output_dir>/run_status.json` (rank 0, written whole then renamed into place): how the latest start of
    the run ended so far: running | finished | stopped (a signal) | time_limit (train.time_limit: requeue it).
    A requeue script reads it where the launcher hides the exit code (torchrun exits 1 for any failed rank)."""
    if rank != 0:
        return
    path = os.path.join(out_dir, STATUS_NAME)
    rec = {"status": status, "step": int(step), "exit_code": int(exit_code), "host": socket.gethostname(),
           "pid": os.getpid(), "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    with open(path + ".tmp", "w") as f:
        json.dump(rec, f)
    os.replace(path + ".tmp", path)
