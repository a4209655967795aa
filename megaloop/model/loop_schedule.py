"""How many loop iterations a training micro-batch runs.

Every rank of a parallel job (all TP ranks, every pipeline stage, the recompute pass of activation
checkpointing) must agree on R for a micro-batch. So R is a pure function of
(seed, step, micro-batch index), drawn from a private generator, never from the global RNG.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np

from megaloop.config import LoopScheduleConfig


@dataclass(frozen=True)
class LoopCount:
    total: int  # iterations run
    grad: int  # the last `grad` iterations carry gradients; the first total-grad run under no_grad


def _draw(cfg: LoopScheduleConfig, seed: int, step: int, micro_batch: int) -> int:
    """The schedule's draw before it is clipped to [loop.min, loop.max]."""
    if cfg.sampling == "fixed":
        return int(cfg.mean)
    rng = np.random.Generator(np.random.PCG64([seed, step, micro_batch, 0x100B]))
    if cfg.sampling == "poisson":  # Parcae: T ~ max(1, Poisson(mu))
        return int(rng.poisson(cfg.mean))
    # Huginn: tau ~ LogNormal(ln(mean) - s^2/2, s), r = Poisson(tau) + 1
    tau = rng.lognormal(math.log(cfg.mean) - cfg.sigma ** 2 / 2, cfg.sigma)
    return int(rng.poisson(tau)) + 1


def sample_loops(cfg: LoopScheduleConfig, seed: int, step: int, micro_batch: int = 0) -> LoopCount:
    total = min(max(_draw(cfg, seed, step, micro_batch), cfg.min), cfg.max)
    return LoopCount(total, grad_loops(cfg, total))


def clipping_warning(cfg: LoopScheduleConfig, seed: int = 0, n: int = 4096, tolerance: float = 0.02) -> Optional[str]:
    """A one-line warning when clipping to [loop.min, loop.max] moves the mean loop count by more than
    `tolerance` (relative): Huginn's heavy-tailed LogNormal-Poisson with mean 32 under the default max 32
    averages about 26, not 33. It names the loop.max that keeps 99 % of the draws; None otherwise (a
    light tail clipped now and then changes nothing that matters)."""
    if cfg.sampling == "fixed":
        return None
    raw = np.array([_draw(cfg, seed, s, 0) for s in range(n)])
    clipped = np.clip(raw, cfg.min, cfg.max)
    if abs(clipped.mean() - raw.mean()) <= tolerance * raw.mean():
        return None
    over = float(np.mean(raw > cfg.max))
    q99 = int(np.ceil(np.quantile(raw, 0.99)))
    return (f"loop.max={cfg.max} clips {100 * over:.1f}% of the sampled loop counts (loop.sampling={cfg.sampling}, "
            f"loop.mean={cfg.mean:g}): R averages {clipped.mean():.1f} instead of {raw.mean():.1f}; "
            f"loop.max={q99} would keep 99% of the draws")


def grad_loops(cfg: LoopScheduleConfig, loops):
    """How many of `loops` iterations carry gradients (the last ones; loop.backprop_loops truncates)."""
    return loops if cfg.backprop_loops is None else min(loops, cfg.backprop_loops)


def expected_loops(cfg: LoopScheduleConfig, seed: int = 0, n: int = 4096) -> float:
    """Monte-Carlo mean of R under the schedule (for FLOP accounting and logging)."""
    return float(np.mean([sample_loops(cfg, seed, s).total for s in range(n)]))


def expected_loop_counts(cfg, n: int = 512) -> Tuple[float, float]:
    """(mean R of a run's loop schedule under its seed, the gradient-carrying loops of that mean) for
    FLOP accounting and the pipeline stage weights; `cfg` is the full Config."""
    mean = expected_loops(cfg.loop, cfg.train.seed, n=n)
    return mean, grad_loops(cfg.loop, mean)
