"""The pretraining entry point: `deepspeed pretrain_looped.py --config PATH [section.key=value ...]`.

Every rank runs `main`: parse the flags, load and validate the config, run the Trainer. Known failures end
in one line on stderr (megaloop.errors.run_cli) and an exit code: 2 for what the user can fix (config,
data, checkpoint, output folder), 3 when training stopped (a non-finite loss). A run stopped by
train.time_limit (checkpoint saved) exits with 75 (megaloop.training.time_limit.EXIT_TIME_LIMIT): requeue it.
"""
from __future__ import annotations

import argparse
import sys

from megaloop.config import ConfigError, load_config
from megaloop.errors import run_cli, should_report
from megaloop.training.faults import FaultPlan
from megaloop.training.time_limit import EXIT_TIME_LIMIT
from megaloop.training.trainer import Trainer, TrainingError

EXIT_NONFINITE = 3


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description="Pretrain a looped LM with DeepSpeed",
                                 epilog="overrides: section.key=value, e.g. train.steps=200 parallel.zero_stage=1")
    ap.add_argument("--config", required=False, default=None, help="YAML config")
    ap.add_argument("--load", default=None, help="checkpoint root or tag directory to resume from")
    ap.add_argument("--no-auto-resume", action="store_true", help="ignore checkpoints in the output directory")
    ap.add_argument("--override-resume-config", action="store_true",
                    help="resume even where the config changes fields a resume does not apply (model, data, seed, "
                         "batch, precision): the given values are used")
    ap.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("overrides", nargs="*", help="section.key=value")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    """Every rank: one line and exit 2 for a problem the user can fix (config, data, checkpoint, output
    folder; rank 0 prints it, MEGALOOP_DEBUG=1 or --debug adds tracebacks), 3 for a non-finite loss, 75 when
    train.time_limit stopped the run."""
    return run_cli(_main, argv)


def _main(argv) -> int:
    args = parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    if args.load:
        if cfg.init.from_:
            raise ConfigError(f"--load {args.load} and init.from={cfg.init.from_!r} are both set: --load continues a "
                              f"run (weights, optimizer, step), init.from starts a new one from weights only; set one")
        cfg.train.load = args.load
    if args.no_auto_resume:
        cfg.train.auto_resume = False
    try:
        result = Trainer(cfg, faults=FaultPlan.from_env(),
                         override_resume_config=args.override_resume_config).run()
    except TrainingError as exc:
        if should_report():
            print(f"training stopped: {exc}", file=sys.stderr, flush=True)
        return EXIT_NONFINITE
    if result.get("time_limit"):
        _all_ranks_done()
        return EXIT_TIME_LIMIT
    return 0 if result.get("ok", True) else 1


def _all_ranks_done() -> None:
    """Before a non-zero exit that is not a failure: every rank has finished (checkpoint, logs, lock), since
    a launcher (deepspeed's launch.py, torchrun) tears the other ranks down when one exits non-zero."""
    import deepspeed.comm as dist
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


if __name__ == "__main__":
    sys.exit(main())
