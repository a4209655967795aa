"""train.time_limit: stop cleanly before the job's allocation ends, so that a requeued job resumes.

The deadline is `train.time_limit` minutes after this process started, or with `time_limit: slurm` the job's
end time (`$SLURM_JOB_END_TIME`, seconds since the epoch: Slurm >= 23.02 sets it; scripts/slurm/pretrain.sbatch
fills it from `squeue` on older versions), less `train.time_limit_margin` minutes. Each rank compares the
clock with it after every step (host-side, no device work) and, once past it, asks to stop; the request goes
through StopAgreement like a signal, so every rank stops at the same step, saves a checkpoint and exits with
EXIT_TIME_LIMIT (75, sysexits' EX_TEMPFAIL: a temporary failure, retry later), which a requeue script tells
from success (0), a config or data error (2), a non-finite loss (3) or a crash. Under torchrun, whose own exit
code is 1 whenever a rank exits non-zero, `<output_dir>/run_status.json` says the same ("time_limit").
"""
from __future__ import annotations

import os
import time
from typing import Optional

from megaloop.config import ConfigError
from megaloop.config.operations import parse_time_limit

EXIT_TIME_LIMIT = 75


def process_start_time() -> float:
    try:
        import psutil
        return psutil.Process().create_time()
    except Exception:  # noqa: BLE001 - no psutil: the first call's time (the trainer's start)
        return time.time()


class Deadline:
    def __init__(self, at: float, what: str):
        self.at, self.what = at, what

    @classmethod
    def from_config(cls, t, environ=None) -> Optional["Deadline"]:
        """t: the TrainConfig. None without train.time_limit."""
        if t.time_limit is None:
            return None
        env = os.environ if environ is None else environ
        minutes = parse_time_limit(t.time_limit)
        margin = 60.0 * t.time_limit_margin
        if minutes is not None:
            return cls(process_start_time() + 60.0 * minutes - margin,
                       f"train.time_limit={t.time_limit} min from the start, less {t.time_limit_margin:g} min")
        end = env.get("SLURM_JOB_END_TIME", "")
        try:
            end_s = float(end)
        except ValueError:
            raise ConfigError(f"train.time_limit=slurm needs $SLURM_JOB_END_TIME (the job's end, seconds since the "
                              f"epoch; Slurm >= 23.02 sets it, scripts/slurm/pretrain.sbatch fills it from squeue), "
                              f"got {end!r}; or give the limit in minutes") from None
        return cls(end_s - margin, f"the SLURM job's end time less {t.time_limit_margin:g} min")

    def passed(self, now: Optional[float] = None) -> bool:
        return (time.time() if now is None else now) >= self.at

    def describe(self) -> str:
        return f"time limit: stop at {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(self.at))} ({self.what})"
