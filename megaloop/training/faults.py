"""Injected faults for the failure-handling tests: a plan object the trainer consults, empty in real runs.

The tests reach a training subprocess through the environment (`MEGALOOP_FAULT=kind:arg[:arg]`), which
`FaultPlan.from_env` reads once in the entry point; nothing else in the trainer looks at the environment.

    die_at_step:S:R   rank R exits with code 13 just before step S (a dead rank)
    stop_at_step:S:R  rank R stops itself (SIGSTOP) just before step S (a hung rank: alive, silent)
    nan_at_step:S     the loss of step S is made non-finite (the NaN stop)
    die_in_save:S     the process exits with code 17 in the middle of the checkpoint save of step S
                      (after its files, before the marker; under train.async_save in the writer thread)
    slow_save:S:SEC   the checkpoint write of step S first sleeps SEC seconds (async_save: in the writer)
    full_disk_in_save:S:R  rank R's save of step S fails with ENOSPC after its files (a full disk on its node)
Several faults: separated by commas (`slow_save:4:2,die_in_save:4`).
"""
from __future__ import annotations

import errno
import os
import signal
from dataclasses import dataclass
from typing import Callable, Optional, Tuple


@dataclass(frozen=True)
class FaultPlan:
    die_at: Optional[Tuple[int, int]] = None  # (step, rank)
    nan_at: Optional[int] = None
    die_in_save_at: Optional[int] = None
    slow_save: Optional[Tuple[int, float]] = None  # (step, seconds)
    stop_at: Optional[Tuple[int, int]] = None  # (step, rank)
    full_disk_at: Optional[Tuple[int, int]] = None  # (step, rank)

    @classmethod
    def from_env(cls, environ=None) -> "FaultPlan":
        spec = (environ if environ is not None else os.environ).get("MEGALOOP_FAULT", "")
        fields = {}
        for one in filter(None, spec.split(",")):
            fields.update(cls._parse(one, spec))
        return cls(**fields)

    @staticmethod
    def _parse(one: str, spec: str) -> dict:
        kind, *args = one.split(":")
        try:
            if kind == "die_at_step":
                return {"die_at": (int(args[0]), int(args[1]))}
            if kind == "stop_at_step":
                return {"stop_at": (int(args[0]), int(args[1]))}
            if kind == "full_disk_in_save":
                return {"full_disk_at": (int(args[0]), int(args[1]))}
            if kind == "nan_at_step":
                return {"nan_at": int(args[0])}
            if kind == "die_in_save":
                return {"die_in_save_at": int(args[0])}
            if kind == "slow_save":
                return {"slow_save": (int(args[0]), float(args[1]))}
        except (IndexError, ValueError):
            pass
        raise ValueError(f"MEGALOOP_FAULT={spec!r}: expected die_at_step:STEP:RANK, stop_at_step:STEP:RANK, "
                         f"nan_at_step:STEP, die_in_save:STEP, full_disk_in_save:STEP:RANK or slow_save:STEP:SECONDS "
                         f"(several: comma-separated)")

    def before_step(self, step: int, rank: int) -> None:
        if self.die_at is not None and self.die_at == (step, rank):
            os._exit(13)
        if self.stop_at is not None and self.stop_at == (step, rank):
            os.kill(os.getpid(), signal.SIGSTOP)

    def loss(self, step: int, loss):
        return loss * float("nan") if self.nan_at == step else loss

    def save_hook(self, step: int, rank: int = 0) -> Optional[Callable[[str], None]]:
        """Called by save_training after this rank's files, before the barrier."""
        if self.full_disk_at == (step, rank):
            def full(tag):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), tag)
            return full
        if self.die_in_save_at != step:
            return None

        def die(tag):
            os._exit(17)
        return die

    def slow_hook(self, step: int) -> Optional[Callable[[], None]]:
        if self.slow_save is None or self.slow_save[0] != step:
            return None
        import time
        return lambda: time.sleep(self.slow_save[1])
