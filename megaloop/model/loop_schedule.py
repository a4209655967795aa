"""How many loop iterations a training micro-batch runs.

Every rank of a parallel job (all TP ranks, every pipeline stage, the recompute pass of activation
checkpointing) must agree on R for a micro-batch. So R is a pure function of
(seed, step, micro-batch index), drawn from a private generator, never from the global RNG.

loop.granularity='sequence' (Parcae's per-sequence draw) gives every row of the micro-batch its own R, a
pure function of (seed, step, micro-batch index, row); the block runs the largest and each row stops at
its own depth (megaloop/model/looped_block.py). The loop counts travel as a long tensor: [R, R_grad] for
a micro-batch, or one [R_b, R_grad_b] row per sequence, shape (B, 2) (`loops_tensor`, `unpack_loops`,
`logged_loops`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Tuple

import numpy as np
import torch

from megaloop.config import LoopScheduleConfig


@dataclass(frozen=True)
class LoopCount:
    total: int  # iterations run
    grad: int  # the last `grad` iterations carry gradients; the first total-grad run under no_grad


def _draw(cfg: LoopScheduleConfig, seed: int, step: int, micro_batch: int, row: Optional[int] = None) -> int:
    """The schedule's draw before it is clipped to [loop.min, loop.max]; `row`: one sequence's own draw."""
    if cfg.sampling == "fixed":
        return int(cfg.mean)
    key = [seed, step, micro_batch, 0x100B] if row is None else [seed, step, micro_batch, 0x5E0, row]
    rng = np.random.Generator(np.random.PCG64(key))
    if cfg.sampling == "poisson":  # Parcae: T ~ max(1, Poisson(mu))
        return int(rng.poisson(cfg.mean))
    # Huginn: tau ~ LogNormal(ln(mean) - s^2/2, s), r = Poisson(tau) + 1
    tau = rng.lognormal(math.log(cfg.mean) - cfg.sigma ** 2 / 2, cfg.sigma)
    return int(rng.poisson(tau)) + 1


def sample_loops(cfg: LoopScheduleConfig, seed: int, step: int, micro_batch: int = 0) -> LoopCount:
    total = min(max(_draw(cfg, seed, step, micro_batch), cfg.min), cfg.max)
    return LoopCount(total, grad_loops(cfg, total))


def sample_row_loops(cfg: LoopScheduleConfig, seed: int, step: int, micro_batch: int, rows: int) -> List[LoopCount]:
    """One LoopCount per row of the micro-batch (loop.granularity='sequence'): row b's R comes from its
    own generator keyed by (seed, step, micro_batch, b), so it depends neither on the batch size nor on
    the rank or stage that asks."""
    out = []
    for b in range(rows):
        total = min(max(_draw(cfg, seed, step, micro_batch, b), cfg.min), cfg.max)
        out.append(LoopCount(total, grad_loops(cfg, total)))
    return out


def loops_tensor(cfg: LoopScheduleConfig, seed: int, step: int, micro_batch: int, rows: int) -> torch.Tensor:
    """The loop counts of one training micro-batch as they travel with it: [R, R_grad], or (rows, 2) with
    one [R_b, R_grad_b] per sequence under loop.granularity='sequence'."""
    if cfg.granularity == "sequence":
        counts = sample_row_loops(cfg, seed, step, micro_batch, rows)
        return torch.tensor([[c.total, c.grad] for c in counts], dtype=torch.long)
    lc = sample_loops(cfg, seed, step, micro_batch)
    return torch.tensor([lc.total, lc.grad], dtype=torch.long)


def fixed_loops_tensor(cfg: LoopScheduleConfig, loops: int, rows: int) -> torch.Tensor:
    """A fixed R (evaluation) in the layout `loops_tensor` uses (the pipeline's buffers keep one shape)."""
    pair = torch.tensor([loops, loops], dtype=torch.long)
    return pair.expand(rows, 2).clone() if cfg.granularity == "sequence" else pair


def unpack_loops(loops: torch.Tensor):
    """(total, grad) of a loop-count tensor: ints for [R, R_grad]; for per-row counts (B, 2) the (B,)
    tensors of the rows' totals and gradient loops (read on the host by the block, once)."""
    if loops.dim() == 1:
        total, grad = (int(v) for v in loops.tolist())
        return total, grad
    return loops[:, 0], loops[:, 1]


def logged_loops(loops: torch.Tensor) -> float:
    """The R a micro-batch's loop counts (on the host) stand for in the logs and the FLOP accounting: R, or
    under loop.granularity='sequence' the mean of the rows' R (the block computes each row R_b times)."""
    return int(loops[0]) if loops.dim() == 1 else float(loops[:, 0].double().mean())


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
    FLOP accounting and the pipeline stage weights; `cfg` is the full Config. Under
    loop.granularity='sequence' too: each row's R has the schedule's distribution and the block computes
    each row only for its own R."""
    mean = expected_loops(cfg.loop, cfg.train.seed, n=n)
    return mean, grad_loops(cfg.loop, mean)
