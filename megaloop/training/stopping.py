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
had received SIGTERM.
"""
from __future__ import annotations

import collections
import os
import signal
import threading
from typing import Optional

import torch


class StopFlag:
    def __init__(self):
        self.signum = None
        self.reason = None
        self._old = {}

    def install(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass

    def _handle(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # second Ctrl-C: stop now
        self.request(signum, signal.Signals(signum).name)

    def request(self, signum: int, reason: str) -> None:
        if self.signum is None:
            self.signum, self.reason = signum, reason

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
        if self.flag.signum is not None and not self.sent:
            self.local.fill_(1.0)  # (a kernel, not a copy from the host)
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

    def should_stop(self, step: int) -> bool:
        """After step `step`: has some rank asked to stop by step `step - LAG`? (Same answer on every rank.)"""
        while self.pending and self.pending[0][0] <= step - self.LAG:
            _, event, value = self.pending.popleft()
            if event is not None:
                event.synchronize()  # that step ended long ago on the device: no stall
            if float(value[0]) > 0:
                return True
        return False


class LauncherWatchdog(threading.Thread):
    """Under `deepspeed` -> launch.py -> ranks: request a stop when the runner above launch.py is gone."""

    def __init__(self, flag: StopFlag, launcher_pid: int, runner_pid: int, interval: float = 1.0):
        super().__init__(name="megaloop-launcher-watchdog", daemon=True)
        self.flag, self.launcher_pid, self.runner_pid, self.interval = flag, launcher_pid, runner_pid, interval
        self._done = threading.Event()

    @classmethod
    def start_if_launched(cls, flag: StopFlag, interval: float = 1.0) -> Optional["LauncherWatchdog"]:
        try:
            import psutil
            launcher = psutil.Process(os.getppid())
            if "deepspeed.launcher.launch" not in " ".join(launcher.cmdline()):
                return None
            runner = launcher.ppid()
        except Exception:  # noqa: BLE001 - no psutil / no permission: nothing to watch
            return None
        if runner <= 1:
            return None
        dog = cls(flag, launcher.pid, runner, interval)
        dog.start()
        return dog

    def run(self):
        import psutil
        while not self._done.wait(self.interval):
            try:
                launcher = psutil.Process(self.launcher_pid)
                gone = not launcher.is_running() or launcher.ppid() != self.runner_pid
            except psutil.Error:
                gone = True
            if gone:
                self.flag.request(signal.SIGTERM, f"the deepspeed runner (pid {self.runner_pid}) exited")
                return

    def stop(self):
        self._done.set()
