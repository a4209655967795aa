"""Run logging: a console line per interval, metrics.jsonl, the trackers of train.loggers (TensorBoard, W&B,
MLflow: megaloop/training/trackers.py), memory per rank. A log that cannot be written (a full disk) ends the
run with one line naming the folder (`output_error`)."""
from __future__ import annotations

import json
import os
import time
from typing import Optional

import torch


def memory_bytes() -> float:
    """This rank's memory: accelerator peak allocated on GPUs, process RSS (psutil) on CPU."""
    from deepspeed.accelerator import get_accelerator
    acc = get_accelerator()
    if acc.device_name() != "cpu":
        return float(acc.max_memory_allocated())
    import psutil
    return float(psutil.Process().memory_info().rss)


def peak_rss_bytes() -> float:
    """Peak RSS of this process so far (Linux ru_maxrss is KiB)."""
    import resource
    return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024.0


class RunLogger:
    """Writes only on the logging rank (last stage, DP 0, TP 0); a no-op elsewhere.

    `cfg` (the Config) names the sinks in train.loggers: metrics.jsonl here, TensorBoard / W&B / MLflow through
    megaloop.training.trackers (each gets every scalar, under the same name); the config and `describe()` (the
    git commit and layout: trackers.run_description) are logged once to each tracker."""

    def __init__(self, output_dir: str, active: bool, cfg=None, describe=None):
        from megaloop.config.schema import Config
        self.active = active
        self.trackers = []
        self.metrics = None
        if not active:
            return
        cfg = cfg if cfg is not None else Config()
        try:
            os.makedirs(output_dir, exist_ok=True)
            if "jsonl" in cfg.train.loggers:
                self.metrics = open(os.path.join(output_dir, "metrics.jsonl"), "a")
        except OSError as e:
            raise output_error(e, output_dir, "metrics.jsonl") from None
        from megaloop.training.trackers import build_trackers
        self.trackers = build_trackers(cfg.train, output_dir)
        if self.trackers:
            config, description = cfg.to_dict(), (describe() if describe is not None else {})
            for tracker in self.trackers:
                tracker.describe(config, description)

    def scalars(self, step: int, values: dict, prefix: str = "train/") -> None:
        if not self.trackers:
            return
        named = {prefix + k: float(v) for k, v in values.items() if v is not None}
        for tracker in self.trackers:
            tracker.scalars(step, named)

    def record(self, row: dict) -> None:
        if self.metrics is None:
            return
        try:
            self.metrics.write(json.dumps(row) + "\n")
            self.metrics.flush()
        except OSError as e:  # a full disk: one line naming the folder
            raise output_error(e, os.path.dirname(self.metrics.name), "metrics.jsonl") from None

    def console(self, text: str) -> None:
        if self.active:
            print(f"[megaloop {time.strftime('%H:%M:%S')}] {text}", flush=True)

    def close(self) -> None:
        trackers, self.trackers = self.trackers, []
        try:
            for tracker in trackers:
                tracker.close()
        finally:
            if self.metrics is not None:
                try:
                    self.metrics.close()
                except OSError:
                    pass  # (its rows were flushed one by one; a failed flush was reported there)
                self.metrics = None


def output_error(e: OSError, folder: str, what: str):
    """The one line for a log that cannot be written (a full disk): names the folder (megaloop.errors.OutputError)."""
    from megaloop.errors import OutputError
    return OutputError(e, folder, f"writing {what} failed; the checkpoints are as the last save left them")


def fmt_bytes(n: Optional[float]) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024.0
    return str(n)


def fmt_duration(seconds: float) -> str:
    seconds = int(max(0.0, seconds))
    h, m, s = seconds // 3600, seconds // 60 % 60, seconds % 60
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def fmt_count(n: float) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def log_interval(logger: RunLogger, step: int, total_steps: int, row: dict, stats: dict, tok_s: float,
                 flop_s: float, r_mean: float, world: int, peak_flops: Optional[float], tokens_seen: float = 0.0,
                 eta_s: Optional[float] = None) -> None:
    """One logging step: the trackers' scalars, the throughput row of metrics.jsonl and the console line
    (with the tokens seen so far and the ETA at this interval's speed)."""
    share = (flop_s / world / peak_flops) if peak_flops else None
    mem = stats["memory"]
    logger.scalars(step, {"loss": row["loss"], "lr": row["lr"], "grad_norm": row["grad_norm"],
                          "loss_scale": row["loss_scale"], "tokens_per_s": tok_s, "flops_per_s": flop_s,
                          "flops_per_s_per_device": flop_s / world, "peak_flops_share": share,
                          "loops_R": r_mean, "memory_max_bytes": max(mem), "tokens_seen": tokens_seen})
    logger.record({"step": step, "tokens_per_s": tok_s, "flops_per_s": flop_s, "peak_flops_share": share,
                   "memory_max_bytes": max(mem), "tokens_seen": tokens_seen, "eta_s": eta_s})
    logger.scalars(step, {f"rank{r}": m for r, m in enumerate(mem)}, prefix="memory/")
    diag = stats.get("diag")
    if diag:
        logger.scalars(step, {f"{k}/loop{i + 1:02d}": v for k, vals in diag.items() for i, v in enumerate(vals)},
                       prefix="loops/")
        logger.record({"step": step, "per_loop": diag})  # {key: [loop 1, loop 2, ...]}
    sn = stats.get("injection_spectral_norm")
    if sn is not None:
        logger.scalars(step, {"injection_spectral_norm": sn}, prefix="loops/")
        logger.record({"step": step, "injection_spectral_norm": sn})
    if row.get("stage"):  # train.stage: the loss is the stage's own (megaloop/training/stages.py)
        logger.scalars(step, {row["stage_loss"]: row["loss"]}, prefix=f"stage_{row['stage']}/")
    gn = row["grad_norm"]
    loss_name = f"{row['stage']} {row['stage_loss']}" if row.get("stage") else "loss"
    parts = [f"step {step}/{total_steps}", f"{loss_name} {row['loss']:.4f}", f"lr {row['lr']:.2e}",
             f"gnorm {gn:.3f}" if gn is not None else "gnorm -", f"R {r_mean:g}",
             f"tok/s {tok_s:,.0f}", f"FLOP/s {flop_s:.3g}" + (f" ({100 * share:.1f}% of peak)" if share else ""),
             f"mem max {fmt_bytes(max(mem))}", f"tokens {fmt_count(tokens_seen)}"]
    if eta_s is not None:
        parts.append(f"ETA {fmt_duration(eta_s)}")
    if row["loss_scale"] is not None:
        parts.append(f"scale {row['loss_scale']:g}")
    if "kl" in row:  # train.distill: the final loop's KL to the teacher (and each loop's, in the warm-up)
        logger.scalars(step, {"distill_kl": row["kl"]})
        for i, v in enumerate(row.get("kl_per_loop") or []):
            logger.scalars(step, {f"distill_kl/loop{i + 1:02d}": v}, prefix="loops/")
        parts.append(f"kl {row['kl']:.4f}" + (" per loop " + " ".join(f"{v:.3f}" for v in row["kl_per_loop"])
                                              if row.get("kl_per_loop") else ""))
    if diag:
        parts.append("|x(k)| " + " ".join(f"{v:.1f}" for v in diag["residual_norm"]))
    if sn is not None:
        parts.append(f"inj spectral norm {sn:.4f}")  # Parcae: max |A_bar| (< 1: a stable recurrence)
    logger.console(" | ".join(parts))
