"""Stopping a run cleanly.

SIGTERM / SIGINT set a flag (`StopFlag`). `StopAgreement` makes every rank agree on it without a host
sync per step: after each step the flag goes through a tiny all-reduce on the device, whose result is read
two steps later (the device has the next step queued by then, so the read never stalls it); every rank
reads the same reduced value at the same step, saves a checkpoint and exits 0. A second Ctrl-C stops at
once.

Under DeepSpeed's launcher, SIGTERM to the `launch.py` process reaches the ranks (it terminates its
children, killing them after 30 s); SIGTERM to the `deepspeed` runner does not (DeepSpeed forwards signals
only for pdsh multi-node launches) and would leave launch.py and the ranks running. `LauncherWatchdog`
closes that gap: a rank whose launcher lost its runner (the runner exited or was killed) stops as if it
had received SIGTERM. Under torchrun (which does forward SIGTERM) and under srun it watches the process that
started the rank: a rank whose torchrun agent (or slurmstepd) died, re-parenting it, stops the same way.

`RunStops` puts these together for one run, with train.time_limit (megaloop.training.time_limit): a rank
past the deadline asks to stop like a signal does, but its request is agreed as "time's up" (code 2
instead of 1), so every rank exits with the time-limit code.
"""
from __future__ import annotations

import collections
import os
import signal
import threading
from typing import Optional

import torch


STOP, TIME_UP = 1.0, 2.0  # the agreed stop codes (all-reduced with MAX: time's up wins)


class StopFlag:
    def __init__(self):
        self.signum = None
        self.reason = None
        self.code = 0.0  # 0: run on; STOP; TIME_UP
        self._old = {}

    def install(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass

    def _handle(self, signum, frame):
        if self.code and signum == signal.SIGINT:
            raise KeyboardInterrupt  # second Ctrl-C: stop now
        self.request(signum, signal.Signals(signum).name)

    def request(self, signum: Optional[int], reason: str, code: float = STOP) -> None:
        if not self.code:
            self.signum, self.reason, self.code = signum, reason, code

    def restore(self):
        for sig, old in self._old.items():
            signal.signal(sig, old)


class StopAgreement:
    """All ranks decide to stop at the same step, `LAG` steps after the request reached some rank."""

    LAG = 2

    def __init__(self, flag: StopFlag, device):
        from deepspeed.accelerator import get_accelerator
        self.flag, self.acc = flag, get_accelerator()
        self.local = torch.zeros(1, device=device)  # this rank's request, kept on the device
        self.sent = False
        self.pending = collections.deque()  # (step, event or None, reduced value)

    def after_step(self, step: int) -> None:
        import deepspeed.comm as dist
        if self.flag.code and not self.sent:
            self.local.fill_(self.flag.code)  # (a kernel, not a copy from the host)
            self.sent = True
        reduced = self.local.clone()
        dist.all_reduce(reduced, op=dist.ReduceOp.MAX)
        if reduced.device.type == "cpu":
            self.pending.append((step, None, reduced))
            return
        host = self.acc.pin_memory(torch.empty(1, device="cpu"))  # the read-back buffer, never a collective's
        host.copy_(reduced, non_blocking=True)
        event = self.acc.Event()
        event.record()
        self.pending.append((step, event, host))

    def should_stop(self, step: int) -> float:
        """After step `step`: the stop code some rank asked for by step `step - LAG` (0: none; STOP; TIME_UP).
        Same answer on every rank."""
        while self.pending and self.pending[0][0] <= step - self.LAG:
            _, event, value = self.pending.popleft()
            if event is not None:
                event.synchronize()  # that step ended long ago on the device: no stall
            if float(value[0]) > 0:
                return float(value[0])
        return 0.0


def launcher_kind(cmdline: str) -> Optional[str]:
    """Which launcher a rank's parent process is, from its command line: deepspeed's launch.py, torchrun
    (torch.distributed.run / launch) or slurmstepd (ranks started by srun itself)."""
    if "deepspeed.launcher.launch" in cmdline:
        return "deepspeed"
    if "torch.distributed.run" in cmdline or "torch.distributed.launch" in cmdline or "torchrun" in cmdline:
        return "torchrun"
    if "slurmstepd" in cmdline:
        return "srun"
    return None


class LauncherWatchdog(threading.Thread):
    """Request a stop when the launcher above this rank is gone: process `child` is no longer running as a
    child of `parent`. deepspeed: child = launch.py, parent = the `deepspeed` runner; torchrun / srun:
    child = this rank, parent = the torchrun agent / slurmstepd (a dead parent re-parents the rank)."""

    def __init__(self, flag: StopFlag, child_pid: int, parent_pid: int, what: str, interval: float = 1.0):
        super().__init__(name="megaloop-launcher-watchdog", daemon=True)
        self.flag, self.child_pid, self.parent_pid, self.what = flag, child_pid, parent_pid, what
        self.interval = interval
        self._done = threading.Event()

    @classmethod
    def start_if_launched(cls, flag: StopFlag, interval: float = 1.0) -> Optional["LauncherWatchdog"]:
        try:
            import psutil
            launcher = psutil.Process(os.getppid())
            kind = launcher_kind(" ".join(launcher.cmdline()))
            if kind is None:
                return None
            if kind == "deepspeed":
                child, parent, what = launcher.pid, launcher.ppid(), f"the deepspeed runner (pid {launcher.ppid()})"
            else:
                child, parent, what = os.getpid(), launcher.pid, f"the {kind} launcher (pid {launcher.pid})"
        except Exception:  # noqa: BLE001 - no psutil / no permission: nothing to watch
            return None
        if parent <= 1:
            return None
        dog = cls(flag, child, parent, what, interval)
        dog.start()
        return dog

    def gone(self) -> bool:
        import psutil
        try:
            child = psutil.Process(self.child_pid)
            return not child.is_running() or child.ppid() != self.parent_pid
        except psutil.Error:
            return True

    def run(self):
        while not self._done.wait(self.interval):
            if self.gone():
                self.flag.request(signal.SIGTERM, f"{self.what} exited")
                return

    def stop(self):
        self._done.set()


class RunStops:
    """What can end a run early, for one run: signals, the launcher watchdog, train.time_limit."""

    def __init__(self, t, device, console):
        from megaloop.training.time_limit import Deadline
        self.flag = StopFlag()
        self.deadline = Deadline.from_config(t)
        self.flag.install()
        self.agreement = StopAgreement(self.flag, device)
        self.watchdog = LauncherWatchdog.start_if_launched(self.flag)
        if self.deadline is not None:
            console(self.deadline.describe())

    def after_step(self, step: int) -> float:
        """Every step (no host sync): the stop code all ranks agreed on (0: go on)."""
        if self.deadline is not None and not self.flag.code and self.deadline.passed():
            self.flag.request(None, f"time limit: {self.deadline.what}", TIME_UP)
        self.agreement.after_step(step)
        return self.agreement.should_stop(step)

    def reason(self) -> str:
        """Why the agreed stop happened, as this rank can tell. A rank whose own request did not win the race
        (another rank's watchdog fired first, or that rank got the signal) still names the launcher when its
        own launcher is gone too: under one runner every rank loses it at once."""
        if self.flag.reason:
            return self.flag.reason
        if self.watchdog is not None and self.watchdog.gone():
            return f"{self.watchdog.what} exited"
        return "a stop request on another rank"

    def close(self) -> None:
        self.flag.restore()
        if self.watchdog is not None:
            self.watchdog.stop()
