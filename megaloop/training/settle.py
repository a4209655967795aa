"""Settling the steps since the last host sync: one device->host read of their losses and grad norms, and one
all-reduce of (the stop code asked for on any rank, a non-finite loss on any rank).

The trainer calls `settle` on logging, evaluation and checkpoint steps and at the end (never per step): a stop
request is acted on at the next of those steps, and a non-finite loss stops the run there, naming the first bad
step, before any checkpoint could save it.
"""
from __future__ import annotations

import math

import torch

from megaloop.errors import MegaloopError
from megaloop.parallel.device import on_accelerator


class TrainingError(MegaloopError, RuntimeError):
    """Training stopped (a non-finite loss): the message names the step and the last good checkpoint."""


def settle(pending: list, stop_code: float, precision: str, logger, last_good):
    """pending: the steps' rows with device values; stop_code: this rank's stop request (StopFlag.code).
    Returns (rows with floats, recorded to metrics.jsonl; the stop code agreed by all ranks)."""
    import deepspeed.comm as dist
    losses = torch.stack([r["loss"].detach().float().reshape(()) for r in pending])
    norms = [r["grad_norm"] for r in pending]
    norm_t = [i for i, n in enumerate(norms) if isinstance(n, torch.Tensor)]
    flags = torch.stack([on_accelerator(float(stop_code)), (~torch.isfinite(losses)).any().float()])
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    parts = [flags, losses] + ([torch.stack([norms[i].detach().float().reshape(()) for i in norm_t])]
                               if norm_t else [])
    host = torch.cat(parts).tolist()  # the one host sync
    stopping, any_nonfinite = host[0], host[1] > 0
    loss_vals = host[2:2 + len(pending)]
    for i, v in zip(norm_t, host[2 + len(pending):]):
        norms[i] = v
    last_good = last_good or "none (no checkpoint saved yet)"
    rows = []
    for r, lv, gn in zip(pending, loss_vals, norms):
        row = dict(r, loss=lv, grad_norm=None if gn is None else float(gn))
        if "distill" in row:  # (the last micro-batch's, on this rank; settle steps only)
            kls = row.pop("distill").float().tolist()
            row["kl"] = kls[0]
            if len(kls) > 1:
                row["kl_per_loop"] = kls[1:]
        rows.append(row)
        logger.record(row)
        if math.isfinite(lv):
            continue
        if precision == "fp16" and row["skipped"]:
            logger.console(f"step {row['step']}: non-finite loss, step skipped by fp16 loss scaling "
                           f"(scale now {row['loss_scale']})")
            continue
        raise TrainingError(f"non-finite loss ({lv}) at step {row['step']}; last good checkpoint: {last_good}")
    if any_nonfinite and all(math.isfinite(v) for v in loss_vals):
        raise TrainingError(f"non-finite loss on another rank by step {pending[-1]['step']}; "
                            f"last good checkpoint: {last_good}")
    return rows, stopping
