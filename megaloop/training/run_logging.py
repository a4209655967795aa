"""Run logging: TensorBoard scalars, a console line per interval, metrics.jsonl, memory per rank."""
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
    """Writes only on the logging rank (last stage, DP 0, TP 0); a no-op elsewhere."""

    def __init__(self, output_dir: str, active: bool, tensorboard: bool = True):
        self.active = active
        self.writer = None
        self.metrics = None
        if not active:
            return
        os.makedirs(output_dir, exist_ok=True)
        self.metrics = open(os.path.join(output_dir, "metrics.jsonl"), "a")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.writer = SummaryWriter(os.path.join(output_dir, "tensorboard"))
            except Exception as exc:  # tensorboard missing: keep training, say so once
                print(f"[megaloop] TensorBoard disabled: {exc}", flush=True)

    def scalars(self, step: int, values: dict, prefix: str = "train/") -> None:
        if not self.active or self.writer is None:
            return
        for k, v in values.items():
            if v is None:
                continue
            self.writer.add_scalar(prefix + k, float(v), step)

    def record(self, row: dict) -> None:
        if not self.active:
            return
        self.metrics.write(json.dumps(row) + "\n")
        self.metrics.flush()

    def console(self, text: str) -> None:
        if self.active:
            print(f"[megaloop {time.strftime('%H:%M:%S')}] {text}", flush=True)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
        if self.metrics is not None:
            self.metrics.close()


def fmt_bytes(n: Optional[float]) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024.0
    return str(n)
