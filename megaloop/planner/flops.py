"""Model FLOPs per pipeline stage and the step-time arithmetic of a plan.

Per token, each pipeline layer costs its share of `megaloop.model.flops.train_flops_per_token` (forward
+ backward of the gradient-carrying parts, forward only for no-grad loops; recomputation is not model
FLOPs), with the loop counts the run's schedule gives (`expected_loop_counts`, as the trainer and the
pipeline partitioner use). The per-layer split is the partitioner's (`pipeline_layer_weights`) without
its recompute term and its tiny weight for lookups and norms, so the stage sums add up exactly to
train_flops_per_token. A TP rank does 1/tp of its stage's FLOPs.

Step time at a stated MFU (model FLOPs utilisation over the whole step, pipeline bubble and stage
imbalance included):  t_step = tokens_per_step x train_flops_per_token / (world x peak x MFU).
The bubble fraction (p - 1) / (m + p - 1) (m micro-batches per pipeline per step = grad_accum_steps)
and the stage imbalance are reported beside it as what that MFU has to absorb.
"""
from __future__ import annotations

from typing import List

from megaloop.config import Config
from megaloop.model.flops import head_forward_flops, layer_forward_flops, train_flops_per_token
from megaloop.model.loop_schedule import expected_loop_counts
from megaloop.parallel import pipeline as pl
from megaloop.parallel import stage_split


def loop_counts(cfg: Config):
    return expected_loop_counts(cfg)


def layer_model_flops(cfg: Config, names, loops_total: float, loops_grad: float) -> List[float]:
    """Model FLOPs per token of each pipeline layer (sum = train_flops_per_token)."""
    m = cfg.model
    lf = layer_forward_flops(m, cfg.data.seq_len)
    out = []
    for name in names:
        if name == "loop":
            out.append(m.n_loop * lf * ((loops_total - loops_grad) + 3.0 * loops_grad))
        elif name in ("prelude", "coda"):
            out.append(3.0 * lf)
        elif name == "head":
            out.append(3.0 * head_forward_flops(m))
        else:
            out.append(0.0)
    return out


def stage_flops(cfg: Config, parts: List[int]) -> dict:
    """Per stage: model FLOPs per token and the partitioner's weight (with recompute)."""
    names = pl.layer_names(cfg.model)
    total, grad = loop_counts(cfg)
    model = layer_model_flops(cfg, names, total, grad)
    weights = stage_split.layer_flop_weights(cfg, names)
    pp = len(parts) - 1
    return {
        "loops_total": total, "loops_grad": grad,
        "train_flops_per_token": train_flops_per_token(cfg, total, grad, cfg.data.seq_len),
        "stage_model_flops_per_token": [sum(model[parts[s]:parts[s + 1]]) for s in range(pp)],
        "stage_weight": [sum(weights[parts[s]:parts[s + 1]]) for s in range(pp)],
    }


def bubble_fraction(pp: int, micro_batches: int) -> float:
    return (pp - 1) / (micro_batches + pp - 1)


def step_estimate(flops_per_token: float, tokens_per_step: int, world: int, peak_flops: float,
                  mfu: float) -> float:
    """Seconds per optimizer step at the stated MFU."""
    return tokens_per_step * flops_per_token / (world * peak_flops * mfu)
