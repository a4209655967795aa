"""Layout search: every (TP, PP, DP, ZeRO, micro-batch, activation checkpointing) for a world size that
the config validator accepts, keeps the tokens per optimizer step of the given config, fits in the
GPU's memory, ranked by estimated tokens/s.

Candidates: TP a divisor of the GPUs per node (TP stays inside a node), PP a divisor of world / TP,
DP = world / (TP x PP), ZeRO 0-3, micro-batch a power of two up to 4x the config's, grad_accum_steps =
the config's sequences per step / (micro-batch x DP) (must be a whole number), activation
checkpointing none / layer / loop. Each is the config with those keys changed, put through
`megaloop.config.validate` (a layout it refuses is never proposed) and planned by `make_plan`. It fits
when the largest rank's states + activations stay under `headroom` x the GPU's memory (default 0.9:
the CUDA context, communication buffers and fragmentation the planner does not count).

Estimated step time, used for the ranking (relative, not a promise):
    t = t_model x recompute / ((1 - bubble) x balance) + t_tp
  t_model    tokens per step x model FLOPs per token / (world x peak x MFU)   (the plan's step time)
  recompute  (model FLOPs + the checkpointed loops' extra forward) / model FLOPs
  bubble     (p - 1) / (m + p - 1);  balance: mean / heaviest stage weight
  t_tp       the heaviest rank's TP wire bytes per step / the GPU's NVLink bandwidth (not overlapped)
  t_zero     what ZeRO 2 / 3 send beyond one gradient reduction per step (per-micro-batch gradient
             reduce-scatters; ZeRO 3's weight all-gathers) / the network (NVLink inside one node)
The one data-parallel gradient reduction per step is assumed overlapped with the backward. A smaller
micro-batch is assumed to run at the same MFU (it does not at small sizes): among equal estimates the
larger micro-batch ranks first, then the lower ZeRO stage.
"""
from __future__ import annotations

import copy
from typing import List, Optional

from megaloop.config import Config, ConfigError, validate
from megaloop.model.flops import layer_forward_flops
from megaloop.planner.plan import GPU, make_plan

MODES = ("none", "layer", "loop")


def _divisors(n: int) -> List[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def variant(cfg: Config, tp: int, pp: int, zero: int, micro: int, accum: int, ac: str) -> Optional[Config]:
    """cfg with the layout keys changed, or None when the validator refuses it."""
    c = copy.deepcopy(cfg)
    c.parallel.tensor_parallel, c.parallel.pipeline_parallel, c.parallel.zero_stage = tp, pp, zero
    c.train.micro_batch_size, c.train.grad_accum_steps, c.train.activation_checkpointing = micro, accum, ac
    if ac == "none":
        c.train.partition_activations = c.train.cpu_checkpointing = False
    if tp == 1:
        c.parallel.sequence_parallel = False
        c.train.partition_activations = False
    try:
        validate(c)
    except ConfigError:
        return None
    return c


def overrides(c: Config, base: Config) -> str:
    """The override line that turns `base` (the config file as loaded) into the layout `c`: the six
    layout keys always, the others only where they had to change."""
    p, t = c.parallel, c.train
    line = (f"parallel.tensor_parallel={p.tensor_parallel} parallel.pipeline_parallel={p.pipeline_parallel} "
            f"parallel.zero_stage={p.zero_stage} train.micro_batch_size={t.micro_batch_size} "
            f"train.grad_accum_steps={t.grad_accum_steps} train.activation_checkpointing={t.activation_checkpointing}")
    for key, value, old in (("parallel.sequence_parallel", p.sequence_parallel, base.parallel.sequence_parallel),
                            ("train.partition_activations", t.partition_activations, base.train.partition_activations),
                            ("train.cpu_checkpointing", t.cpu_checkpointing, base.train.cpu_checkpointing)):
        if value != old:
            line += f" {key}={str(value).lower()}"
    return line


def estimate(plan: dict, cfg: Config, gpu: GPU, gpus_per_node: int = 8) -> dict:
    m = cfg.model
    grad = plan["loops"]["expected_grad"]
    extra = 0.0  # the checkpointed loops' forward, run again in backward
    if cfg.train.activation_checkpointing != "none":
        extra = m.n_loop * layer_forward_flops(m, cfg.data.seq_len) * grad
    recompute = (plan["train_flops_per_token"] + extra) / plan["train_flops_per_token"]
    balance = 1.0 / plan["stage_imbalance"]
    tp_wire = max(r["tp_comm_bytes_per_step"]["wire"] for r in plan["ranks"])
    dp_s = zero_extra_bytes(plan, cfg) / (gpu.net_bw if plan["world"] > gpus_per_node else gpu.link_bw)
    t = (plan["step_time_s"] * recompute / ((1 - plan["bubble_fraction"]) * balance) + tp_wire / gpu.link_bw
         + dp_s)
    return {"step_s": t, "tokens_per_s": plan["tokens_per_step"] / t, "recompute": recompute,
            "tp_comm_s": tp_wire / gpu.link_bw, "zero_comm_s": dp_s}


def zero_extra_bytes(plan: dict, cfg: Config) -> float:
    """Wire bytes per rank and step that ZeRO 2 / 3 add over the one gradient reduction per step of
    ZeRO 0 / 1 (assumed overlapped with the backward): ZeRO 2 reduce-scatters the gradients every
    micro-batch, ZeRO 3 also all-gathers the weights in every forward and backward."""
    dp, m = plan["dp"], cfg.train.grad_accum_steps
    zero = cfg.parallel.zero_stage
    if dp == 1 or zero < 2:
        return 0.0
    P = max(r["params"] for r in plan["ranks"])
    g = 2 if cfg.train.precision != "fp32" else 4
    ring = (dp - 1) / dp
    extra = (m - 1) * ring * P * g  # the per-micro-batch reduce-scatters beyond one per step
    if zero == 3:
        extra += 2 * m * ring * P * g
    return extra


def search(cfg: Config, world: int, gpu: GPU, mfu: float = 0.4, gpus_per_node: int = 8, headroom: float = 0.9,
           top: Optional[int] = 5) -> dict:
    """{'candidates': the fitting layouts ranked by estimated tokens/s (top ones), 'tried', 'valid', 'fit'}."""
    base_dp = world // (cfg.parallel.tensor_parallel * cfg.parallel.pipeline_parallel)
    if world % (cfg.parallel.tensor_parallel * cfg.parallel.pipeline_parallel):
        base_dp = 1
    seqs = cfg.train.micro_batch_size * cfg.train.grad_accum_steps * max(base_dp, 1)  # sequences per step
    micros = [b for b in (1, 2, 4, 8, 16, 32, 64) if b <= 4 * cfg.train.micro_batch_size]
    zeros = (0, 1, 2, 3)
    cache, out, tried, valid = {}, [], 0, 0
    for tp in _divisors(min(world, gpus_per_node)):
        if world % tp:
            continue
        for pp in _divisors(world // tp):
            dp = world // (tp * pp)
            for ac in MODES:
                for zero in zeros:
                    for micro in micros:
                        if seqs % (micro * dp):
                            continue
                        tried += 1
                        c = variant(cfg, tp, pp, zero, micro, seqs // (micro * dp), ac)
                        if c is None:
                            continue
                        valid += 1
                        plan = make_plan(c, world=world, gpu=gpu, mfu=mfu, cache=cache)
                        need = plan["max_rank_gib"]
                        if need > headroom * gpu.mem_gib:
                            continue
                        est = estimate(plan, c, gpu, gpus_per_node)
                        out.append({"overrides": overrides(c, cfg), "tp": tp, "pp": pp, "dp": dp, "zero_stage": zero,
                                    "micro_batch_size": micro, "grad_accum_steps": c.train.grad_accum_steps,
                                    "activation_checkpointing": ac, "max_rank_gib": need,
                                    "bubble_fraction": plan["bubble_fraction"], **est})
    # fastest first (3 significant digits); among equals the larger micro-batch (better kernel
    # efficiency, which the estimate does not model), then the lower ZeRO stage, then less memory
    out.sort(key=lambda r: (-float(f"{r['tokens_per_s']:.3g}"), -r["micro_batch_size"], r["zero_stage"],
                            r["max_rank_gib"]))
    return {"world": world, "gpu": gpu.to_dict(), "sequences_per_step": seqs,
            "tokens_per_step": seqs * cfg.data.seq_len,
            "tried": tried, "valid": valid, "fit": len(out), "headroom": headroom,
            "candidates": out if top is None else out[:top]}


def format_search(result: dict) -> str:
    from megaloop.planner.plan import _si, _table

    g = result["gpu"]
    lines = [f"{result['fit']} of {result['valid']} valid layouts ({result['tried']} tried) fit in "
             f"{result['headroom']:.0%} of {g['mem_gib']:g} GiB on {result['world']} x {g['name']}; "
             f"{result['tokens_per_step']:,} tokens per step kept; ranked by estimated tokens/s", ""]
    header = ["#", "TP", "PP", "DP", "ZeRO", "micro", "accum", "AC", "max GiB", "bubble", "recompute", "TP comm s",
              "ZeRO comm s", "step s", "tokens/s"]
    rows = [[i + 1, r["tp"], r["pp"], r["dp"], r["zero_stage"], r["micro_batch_size"], r["grad_accum_steps"],
             r["activation_checkpointing"], f"{r['max_rank_gib']:.1f}", f"{r['bubble_fraction']:.3f}",
             f"{r['recompute']:.2f}", f"{r['tp_comm_s']:.3f}", f"{r['zero_comm_s']:.3f}", f"{r['step_s']:.3f}",
             _si(r["tokens_per_s"])]
            for i, r in enumerate(result["candidates"])]
    lines += _table(header, rows) if rows else ["(no layout fits)"]
    lines += ["", "override lines (append to the pretrain_looped.py command):"]
    lines += [f"  {i + 1}. {r['overrides']}" for i, r in enumerate(result["candidates"])]
    return "\n".join(lines)
