"""Non-finite steps: a step whose gradients are not finite never updates the weights; it is skipped,
counted, and `train.max_consecutive_skips` skipped in a row stop the run (exit code 3) naming the newest
good checkpoint (complete, finite and intact: the trainer's `last_good`).

Who skips (DeepSpeed 0.19 already does where it owns the optimizer step; megaloop does the rest):
- ZeRO 1-3 (any precision), bf16 `master_weights` and fp16: DeepSpeed's optimizer wrappers compute the
  global grad norm and, when it is not finite (`is_invalid_grad_norm`: one host read per step, theirs),
  skip the step, count it in `engine.skipped_steps` and hold the LR schedule. fp16 keeps its loss-scale
  skip (a skip with a finite loss there is loss scaling at work and is not counted toward the limit).
- ZeRO 0 with fp32 weights (fp32, bf16 autocast), any TP / PP: DeepSpeed calls torch's AdamW directly and
  would apply a NaN update. `SkipNonFinite`, an optimizer pre-step hook after megaloop's own grad norm
  (engine.SelfClip: all-reduced over TP ranks and stages, the gradients already all-reduced over DP, so
  every rank holds the same norm and takes the same decision without another collective), skips it:
  * fused AdamW (`optimizer_impl: auto` on CUDA, or `fused`): on the device, no host sync. The kernel's
    `found_inf` argument (what torch's GradScaler uses) leaves weights, moments and step count untouched
    when the flag is set. The LR schedule still advances on such a step (holding it would need the flag
    on the host).
  * foreach / for_loop AdamW (the CPU default): one device->host read of the flag per step (free on CPU;
    benchmarks/bench_nonfinite_skip.py measures it on a GPU); a skipped step drops the gradients before
    AdamW runs (it then touches no parameter) and sets `optimizer.overflow`, so DeepSpeed counts it and
    holds the LR schedule as on its own paths. `train.optimizer: muon` (optim.MuonAdamW, AdamW inside it fused
    or not) takes this path too: neither torch's Muon nor AdamW touches a parameter without a gradient.
The skip flag of each step is read with the losses on the trainer's settle steps (one transfer).
"""
from __future__ import annotations

import math
from typing import List, Optional

import torch

from megaloop.errors import MegaloopError
from megaloop.parallel.device import on_accelerator


class TrainingError(MegaloopError, RuntimeError):
    """Training stopped (non-finite steps or weights): the message names the step and the newest good
    checkpoint (complete, finite and intact); exit code 3."""


class SkipNonFinite:
    """Optimizer pre-step hook (registered after engine.SelfClip): skip the step when the global grad norm
    is not finite (see the module doc for how). `take()` returns the last step's flag once (a 0-dim bool
    device tensor on the fused path, a bool otherwise)."""

    def __init__(self, clip):
        self.clip = clip
        self.flag = None

    def __call__(self, optimizer, args, kwargs):
        bad = ~torch.isfinite(self.clip.last_norm)
        if optimizer.defaults.get("fused"):
            optimizer.found_inf = bad.float()  # the fused kernel skips on the device when this is 1
            self.flag = bad
            return
        skip = bool(bad)  # the one host read of this path
        if skip:
            for group in optimizer.param_groups:
                for p in group["params"]:
                    p.grad = None  # AdamW updates only parameters with a gradient: nothing moves
        optimizer.overflow = skip  # DeepSpeed's engine: skipped_steps += 1, LR schedule held
        self.flag = skip

    def take(self):
        flag, self.flag = self.flag, None
        return flag


def step_skipped(te, skipped_before: int):
    """Whether the step just taken was skipped: megaloop's hook flag (device tensor or bool) where it
    decides, else DeepSpeed's `skipped_steps` count moved."""
    flag = te.skip.take() if getattr(te, "skip", None) is not None else None
    if flag is None:
        return getattr(te.engine, "skipped_steps", 0) > skipped_before
    return flag


def skip_flags(pending: List[dict]) -> torch.Tensor:
    """The pending steps' skip flags as one float device tensor (read with the losses)."""
    return torch.stack([r["skipped"].detach().float().reshape(()) if isinstance(r["skipped"], torch.Tensor)
                        else on_accelerator(1.0 if r["skipped"] else 0.0).reshape(()) for r in pending])


class SkipLedger:
    """Counts skipped steps on the settle steps and stops the run after `limit` in a row."""

    def __init__(self, limit: int, precision: str, console):
        self.limit, self.precision, self.console = limit, precision, console
        self.total = 0
        self.in_a_row = 0

    def settle(self, row: dict, last_good: Optional[str]) -> None:
        """One settled step (floats): count a skip, or raise TrainingError for a non-finite loss whose step
        was not skipped or for `limit` skips in a row."""
        lv, good = row["loss"], last_good or "none (no checkpoint saved yet)"
        if not row["skipped"]:
            self.in_a_row = 0
            if not math.isfinite(lv):
                raise TrainingError(f"non-finite loss ({lv}) at step {row['step']}; last good checkpoint: {good}")
            return
        if self.precision == "fp16" and math.isfinite(lv):
            self.console(f"step {row['step']}: skipped by fp16 loss scaling (scale now {row['loss_scale']})")
            return
        self.total += 1
        self.in_a_row += 1
        gn = row.get("grad_norm")
        self.console(f"step {row['step']}: skipped, weights unchanged (non-finite gradients: loss {lv:.4g}"
                     + (f", grad norm {gn:.4g}" if gn is not None else "") + f"); {self.in_a_row} in a row, "
                     f"{self.total} in all (train.max_consecutive_skips={self.limit})")
        if self.in_a_row >= self.limit:
            raise TrainingError(f"{self.in_a_row} steps in a row skipped for non-finite gradients (the last at "
                                f"step {row['step']}; train.max_consecutive_skips={self.limit}); last good "
                                f"checkpoint: {good}")
