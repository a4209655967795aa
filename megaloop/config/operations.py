"""Static checks of the fields that run a job rather than define the model: train.loggers and the trackers'
sections, train.time_limit, train.profile. Called by megaloop.config.validation.validate on every rank, so a
tracker package that is not installed fails every rank with the same one line before anything starts."""
from __future__ import annotations

import importlib.util
import math
from typing import Optional

from megaloop.config.schema import ConfigError

LOGGERS = ("tensorboard", "jsonl", "wandb", "mlflow")
# The package each optional tracker imports (the `track` extra of setup.py installs both).
TRACKER_PACKAGES = {"wandb": "wandb", "mlflow": "mlflow"}


def parse_time_limit(value) -> Optional[float]:
    """train.time_limit -> minutes (float), or None for "slurm" (the deadline is the job's end time).
    Raises ConfigError for anything else."""
    text = str(value).strip().lower()
    if text == "slurm":
        return None
    try:
        minutes = float(text)
    except ValueError:
        minutes = math.nan
    if not (math.isfinite(minutes) and minutes > 0):
        raise ConfigError(f"train.time_limit={value!r} must be a number of minutes > 0 or 'slurm' (the job's end "
                          f"time from $SLURM_JOB_END_TIME), or null for no limit")
    return minutes


def check_operations(t) -> None:
    """t: the TrainConfig."""
    loggers = list(t.loggers or [])
    for name in loggers:
        if name not in LOGGERS:
            raise ConfigError(f"train.loggers: {name!r} is not one of {list(LOGGERS)}")
    if len(set(loggers)) != len(loggers):
        raise ConfigError(f"train.loggers={loggers} names a logger twice")
    for name, package in TRACKER_PACKAGES.items():
        if name in loggers and importlib.util.find_spec(package) is None:
            raise ConfigError(f"train.loggers names {name}, but the {package} package is not installed: "
                              f"pip install -e '.[track]' (or drop {name} from train.loggers)")
    if t.wandb.mode is not None and t.wandb.mode not in ("online", "offline", "disabled"):
        raise ConfigError(f"train.wandb.mode={t.wandb.mode!r} is not one of ['online', 'offline', 'disabled'] "
                          f"(or null: wandb's own default, $WANDB_MODE)")
    if t.time_limit is not None:
        parse_time_limit(t.time_limit)
    ranks = t.profile.ranks
    if not isinstance(ranks, list) or not ranks or not all(isinstance(r, int) and not isinstance(r, bool) and r >= 0
                                                          for r in ranks):
        raise ConfigError(f"train.profile.ranks={ranks!r} must be a non-empty list of global ranks (e.g. [0])")
