"""The run's progress between logging steps: tokens and model FLOPs since the last log, tokens seen, the ETA.

Host-side counting only (no device reads): the trainer calls `after_step` every step and `log` on logging
steps, where the numbers gathered from all ranks (megaloop.training.stats) and the interval's speed go to
megaloop.training.run_logging.log_interval.
"""
from __future__ import annotations

import time

from megaloop.model.flops import train_flops_per_token
from megaloop.model.loop_schedule import grad_loops
from megaloop.training.evaluation import eval_loop_counts
from megaloop.training.run_logging import log_interval
from megaloop.training.stats import gather_stats


class Progress:
    def __init__(self, cfg, state, rank: int, world: int, logger, holds_block: bool, global_batch: int):
        self.cfg, self.state, self.rank, self.world, self.logger = cfg, state, rank, world, logger
        self.tokens_per_step = global_batch * cfg.data.seq_len
        self.reports = holds_block and state.dp_rank == 0 and state.tp_rank == 0  # its block's diagnostics
        self.counts_flops = logger.active
        self._reset()

    def _reset(self) -> None:
        self.t0, self.steps, self.tokens, self.flops = time.time(), 0, 0, 0.0

    def after_step(self, rs: list) -> float:
        """Count one optimizer step whose micro-batches ran R = rs; returns the mean R."""
        cfg = self.cfg
        r_mean = sum(rs) / max(1, len(rs))
        if self.counts_flops:
            grads = grad_loops(cfg.loop, r_mean)
            self.flops += self.tokens_per_step * train_flops_per_token(cfg, r_mean, grads, cfg.data.seq_len)
        self.tokens += self.tokens_per_step
        self.steps += 1
        return r_mean

    def log(self, step: int, row: dict, diag, r_mean: float, consumed_samples: int) -> None:
        """A logging step (collective: every rank gathers its memory and the block's diagnostics)."""
        cfg, t = self.cfg, self.cfg.train
        K = max(cfg.loop.max, cfg.model.loops, *eval_loop_counts(cfg))
        stats = gather_stats(diag, K, self.rank, self.world, self.reports)
        elapsed = max(time.time() - self.t0, 1e-9)
        eta = (t.steps - step) * elapsed / max(1, self.steps)
        log_interval(self.logger, step, t.steps, row, stats, self.tokens / elapsed, self.flops / elapsed, r_mean,
                     self.world, t.peak_flops, tokens_seen=float(consumed_samples * cfg.data.seq_len), eta_s=eta)
        self._reset()
