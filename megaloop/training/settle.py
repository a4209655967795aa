"""Settling the steps since the last host sync: one device->host read of their losses, skip flags and grad
norms, and one all-reduce of (the stop code asked for on any rank, a non-finite loss of a step that was not
skipped on any rank).

The trainer calls `settle` on logging, evaluation and checkpoint steps and at the end (never per step): a stop
request is acted on at the next of those steps; skipped (non-finite) steps are counted there, and too many in a
row, or a non-finite loss of a step that was not skipped, stop the run naming the step
(megaloop/training/nonfinite.py), before any checkpoint could save it.
"""
from __future__ import annotations

import torch

from megaloop.parallel.device import on_accelerator
from megaloop.training.nonfinite import TrainingError, skip_flags  # noqa: F401 (TrainingError: re-exported)


def settle(pending: list, stop_code: float, skips, logger, last_good):
    """pending: the steps' rows with device values; stop_code: this rank's stop request (StopFlag.code);
    skips: the run's nonfinite.SkipLedger. Returns (rows with floats, recorded to metrics.jsonl; the stop code
    agreed by all ranks)."""
    import deepspeed.comm as dist
    n = len(pending)
    losses = torch.stack([r["loss"].detach().float().reshape(()) for r in pending])
    skipped = skip_flags(pending)
    norms = [r["grad_norm"] for r in pending]
    norm_t = [i for i, v in enumerate(norms) if isinstance(v, torch.Tensor)]
    flags = torch.stack([on_accelerator(float(stop_code)), ((~torch.isfinite(losses)) & (skipped == 0)).any().float()])
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    parts = [flags, losses, skipped] + ([torch.stack([norms[i].detach().float().reshape(()) for i in norm_t])]
                                        if norm_t else [])
    host = torch.cat(parts).tolist()  # the one host sync
    stopping, any_nonfinite = host[0], host[1] > 0
    loss_vals, skip_vals = host[2:2 + n], host[2 + n:2 + 2 * n]
    for i, v in zip(norm_t, host[2 + 2 * n:]):
        norms[i] = v
    rows = []
    for r, lv, sk, gn in zip(pending, loss_vals, skip_vals, norms):
        row = dict(r, loss=lv, skipped=sk > 0, grad_norm=None if gn is None else float(gn))
        if "distill" in row:  # (the last micro-batch's, on this rank; settle steps only)
            kls = row.pop("distill").float().tolist()
            row["kl"] = kls[0]
            if len(kls) > 1:
                row["kl_per_loop"] = kls[1:]
        rows.append(row)
        logger.record(row)
        skips.settle(row, last_good)
    if any_nonfinite:  # (this rank's own rows passed: another rank's loss)
        raise TrainingError(f"non-finite loss on another rank by step {pending[-1]['step']}; "
                            f"last good checkpoint: {last_good or 'none (no checkpoint saved yet)'}")
    return rows, stopping
