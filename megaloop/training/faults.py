"""Injected faults for the failure-handling tests: a plan object the trainer consults, empty in real runs.

The tests reach a training subprocess through the environment (`MEGALOOP_FAULT=kind:arg[:arg]`), which
`FaultPlan.from_env` reads once in the entry point; nothing else in the trainer looks at the environment.

    die_at_step:S:R   rank R exits with code 13 just before step S (a dead rank)
    nan_at_step:S     the loss of step S is made non-finite (the NaN stop)
    die_in_save:S     the process exits with code 17 in the middle of the checkpoint save of step S
                      (after its files, before the marker; under train.async_save in the writer thread)
    slow_save:S:SEC   the checkpoint write of step S first sleeps SEC seconds (async_save: in the writer)
Several faults: separated by commas (`slow_save:4:2,die_in_save:4`).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Optional, Tuple


@dataclass(frozen=True)
class FaultPlan:
    die_at: Optional[Tuple[int, int]] = None  # (step, rank)
    nan_at: Optional[int] = None
    die_in_save_at: Optional[int] = None
    slow_save: Optional[Tuple[int, float]] = None  # (step, seconds)

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
            if kind == "nan_at_step":
                return {"nan_at": int(args[0])}
            if kind == "die_in_save":
                return {"die_in_save_at": int(args[0])}
            if kind == "slow_save":
                return {"slow_save": (int(args[0]), float(args[1]))}
        except (IndexError, ValueError):
            pass
        raise ValueError(f"MEGALOOP_FAULT={spec!r}: expected die_at_step:STEP:RANK, nan_at_step:STEP, "
                         f"die_in_save:STEP or slow_save:STEP:SECONDS (several: comma-separated)")

    def before_step(self, step: int, rank: int) -> None:
        if self.die_at is not None and self.die_at == (step, rank):
            os._exit(13)

    def loss(self, step: int, loss):
        return loss * float("nan") if self.nan_at == step else loss

    def save_hook(self, step: int) -> Optional[Callable[[str], None]]:
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
