"""A rank that stopped answering or died: bounded waits, and one line naming it.

Every collective is bounded by `train.dist_timeout` (megaloop.training.distributed sets it on every
process group, and the NCCL watchdog's environment). When one fails on a survivor, gloo's error says
"Timed out waiting 20000ms for recv operation" or "Connection closed by peer [10.0.0.2]:41234": neither
names the rank. So each rank runs a `Heartbeat`: a daemon thread that bumps its own counter in the
rendezvous store (the TCPStore at MASTER_ADDR:MASTER_PORT) every few seconds. A rank stopped (SIGSTOP, a
hung host) or dead bumps no more; on a failed collective `diagnose` reads the counters twice, a few beats
apart, and the ranks whose counter did not move are the ones named. The lowest rank still alive prints the
one line (run_cli: `report_on_this_rank`), every survivor exits with code 2, and the launcher then ends the
remaining ranks. The checkpoints are untouched: `latest` only moves once every rank has saved.
"""
from __future__ import annotations

import contextlib
import datetime
import threading
import time
from typing import Callable, Dict, List, Optional, Sequence

from megaloop.errors import MegaloopError

KEY = "megaloop/heartbeat/{}"
LEFT = "megaloop/left/{}"  # a survivor that diagnosed a failure and exits (not a lost rank)
ERROR = "megaloop/error/{}"  # the one line a rank exits with (a full disk on its node, ...), for the survivors

# What gloo / NCCL / the store say when a peer is gone (the exceptions are plain RuntimeErrors).
_PEER_TEXT = ("timed out waiting", "connection closed by peer", "connection reset by peer", "broken pipe",
              "socket timeout", "watchdog caught collective operation timeout", "nccl communicator was aborted",
              "connection refused", "no route to host", "collective operation timeout")


class PeerLost(MegaloopError, RuntimeError):
    """A collective failed because another rank stopped answering or died; names the rank(s)."""

    def __init__(self, message: str, report_on_this_rank: bool):
        super().__init__(message)
        self.report_on_this_rank = report_on_this_rank


def is_peer_failure(exc: BaseException) -> bool:
    """Whether `exc` (or an exception it was raised from) is a collective or store failing on a lost peer."""
    import torch.distributed as tdist
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, getattr(tdist, "DistError", ())) and not isinstance(exc, MegaloopError):
            return True
        if isinstance(exc, RuntimeError) and any(t in str(exc).lower() for t in _PEER_TEXT):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def beat_interval(dist_timeout: float) -> float:
    """Seconds between beats: a twentieth of the timeout, between 0.5 and 5 (a 600 s timeout: one store write
    per rank every 5 s; the diagnosis after a failure watches 3 beats, at least 5 s)."""
    return min(5.0, max(0.5, dist_timeout / 20.0))


def bounded(fn: Callable[[], object], seconds: float):
    """fn() run on a daemon thread, its result, or None if it raised or did not return within `seconds`. A store
    call to a host that is stopped (SIGSTOP) blocks in recv() for ever, whatever the store's timeout, and holds
    the store client's lock; the thread is left behind (daemon: it does not keep the process alive)."""
    out = []

    def run():
        try:
            out.append(fn())
        except Exception:  # noqa: BLE001 - the store's host is gone or refuses: no answer
            pass

    t = threading.Thread(target=run, name="megaloop-peer-diagnosis", daemon=True)
    t.start()
    t.join(seconds)
    return out[0] if out else None


def window(interval: float) -> float:
    """How long the diagnosis watches the counters: three beats, at least 5 s (a busy rank's heartbeat thread may
    wait for the GIL a while; a live rank wrongly named would mislead more than a few seconds cost)."""
    return max(3.0 * interval, 5.0)


def _store():
    from torch.distributed import distributed_c10d as c10d
    return c10d._get_default_store()


class Heartbeat(threading.Thread):
    """This rank's counter in the rendezvous store, bumped every `interval` seconds until `stop()`."""

    def __init__(self, store, rank: int, interval: float):
        super().__init__(name="megaloop-heartbeat", daemon=True)
        self.store, self.key, self.interval = store, KEY.format(rank), interval
        self._done = threading.Event()

    @classmethod
    def start_for(cls, rank: int, world: int, dist_timeout: float) -> Optional["Heartbeat"]:
        if world <= 1:
            return None
        try:
            store = _store()
        except Exception:  # noqa: BLE001 - no default store (a group made without one): nothing to beat on
            return None
        beat = cls(store, rank, beat_interval(dist_timeout))
        beat.store.add(beat.key, 1)  # (before any collective can fail: every live rank has a counter)
        beat.start()
        return beat

    def run(self):
        while not self._done.wait(self.interval):
            try:
                self.store.add(self.key, 1)
            except Exception:  # noqa: BLE001 - the store's host is gone: the collectives will say so
                return

    def stop(self):
        self._done.set()


def silent_ranks(store, world: int, interval: float, sleep=time.sleep) -> Optional[List[int]]:
    """The ranks whose counter did not move over `window(interval)` seconds, less those that left after a
    diagnosis of their own; None if the store itself did not answer (its host, rank 0, is the one gone)."""
    keys = [KEY.format(r) for r in range(world)]

    def read():
        return [int(store.add(k, 0)) for k in keys]  # add(k, 0): a read that does not wait for a missing key

    try:
        store.set_timeout(datetime.timedelta(seconds=max(5.0, 3 * interval)))
        before = read()
        sleep(window(interval))
        after = read()
        left = [int(store.add(LEFT.format(r), 0)) for r in range(world)]
    except Exception:  # noqa: BLE001 - DistStoreError, timeout, connection refused
        return None
    return [r for r in range(world) if before[r] == after[r] and not left[r]]


def read_errors(store, world: int) -> Dict[int, str]:
    """The one-line errors other ranks left in the store before exiting (PeerWatch.record)."""
    out = {}
    for r in range(world):
        try:
            if store.check([ERROR.format(r)]):
                out[r] = store.get(ERROR.format(r)).decode("utf-8", "replace")
        except Exception:  # noqa: BLE001
            pass
    return out


def describe(exc: BaseException, rank: int, world: int, silent: Optional[Sequence[int]], dist_timeout: float,
             last_good: Optional[str], causes: Optional[Dict[int, str]] = None) -> PeerLost:
    """The one line for a collective that failed on rank `rank` (its own exception `exc`)."""
    text = str(exc).lower()
    closed = any(t in text for t in ("closed by peer", "reset by peer", "broken pipe", "connection refused"))
    if silent is None:
        gone, who = [0], "rank 0 (it hosts the rendezvous store at MASTER_ADDR:MASTER_PORT)"
    else:
        gone = sorted(set(silent) - {rank})
        who = ("rank " if len(gone) == 1 else "ranks ") + ", ".join(map(str, gone))
    causes = {r: c for r, c in (causes or {}).items() if r != rank}
    if causes:  # a rank that failed on its own (a full disk on its node): its line, not "died"
        r, cause = min(causes.items())
        gone = sorted(set(gone) | set(causes))
        reason = f"rank {r} stopped with: {cause}"
    elif not gone:
        reason = (f"a collective waited train.dist_timeout={dist_timeout:g} s although every rank is alive: ranks "
                  f"out of step, or a step slower than that (raise train.dist_timeout)")
    elif closed:
        reason = f"{who} died (connection closed by peer)"
    else:
        reason = (f"{who} stopped answering: no reply within train.dist_timeout={dist_timeout:g} s (stopped, hung, "
                  f"or its host unreachable)")
    ckpt = (f"the last complete checkpoint is {last_good}" if last_good else "no checkpoint was saved in this run")
    if causes and "checkpoint" in reason:  # (the rank's own line already says what became of the checkpoints)
        ckpt = ""
    ending = f"; {ckpt}; restart the job to resume from it" if ckpt else ""
    report = rank == min(set(range(world)) - set(gone))  # the lowest rank still alive prints the line
    return PeerLost(reason + ending, report)


class PeerWatch:
    """What the trainer holds: this rank's heartbeat, and the translation of a failed collective into PeerLost."""

    def __init__(self):
        self.rank, self.world, self.dist_timeout, self.heartbeat = 0, 1, 0.0, None

    def start(self, dist_timeout: float):
        """After init_distributed: this rank's heartbeat. Returns (rank, world size)."""
        import deepspeed.comm as dist
        self.rank, self.world, self.dist_timeout = dist.get_rank(), dist.get_world_size(), dist_timeout
        self.heartbeat = Heartbeat.start_for(self.rank, self.world, dist_timeout)
        return self.rank, self.world

    @contextlib.contextmanager
    def name_lost_ranks(self, last_good: Callable[[], Optional[str]]):
        """Around the whole run: a collective failing on a lost rank becomes PeerLost (one line naming it); this
        rank's own one-line error is left in the store for the others; the heartbeat stops at the end."""
        try:
            yield
        except Exception as exc:
            lost = self.error(exc, last_good())
            if lost is None:
                raise
            raise lost from exc
        finally:
            self.stop()

    def error(self, exc: BaseException, last_good: Optional[str]) -> Optional[PeerLost]:
        """PeerLost naming the lost rank(s) if `exc` is a collective failing on a lost peer, else None. This
        rank keeps beating while it diagnoses (other survivors may be reading the counters too), then marks
        itself as left."""
        if self.world <= 1:
            return None
        if isinstance(exc, (MegaloopError, OSError, ValueError)):  # this rank's own one-line error
            self.record(exc)
            return None
        if not is_peer_failure(exc):
            return None
        beat = self.heartbeat
        if beat is None:
            return describe(exc, self.rank, self.world, None, self.dist_timeout, last_good)

        def diagnose():
            silent = silent_ranks(beat.store, self.world, beat.interval)
            if silent is None:
                return None, {}
            beat.store.add(LEFT.format(self.rank), 1)
            return silent, read_errors(beat.store, self.world)

        found = bounded(diagnose, window(beat.interval) + 10.0)
        self.stop()
        silent, causes = found if found is not None else (None, {})
        return describe(exc, self.rank, self.world, silent, self.dist_timeout, last_good, causes)

    def record(self, exc: BaseException) -> None:
        """Leave this rank's one-line error in the store: the rank that reports (usually rank 0, which did not
        fail itself) names it instead of only "rank N died"."""
        from megaloop.errors import one_line
        if self.heartbeat is not None:
            store, line = self.heartbeat.store, one_line(exc)
            bounded(lambda: store.set(ERROR.format(self.rank), line), 5.0)

    def stop(self) -> None:
        if self.heartbeat is not None:
            self.heartbeat.stop()
