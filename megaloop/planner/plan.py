"""A cluster plan of one config: per (pipeline stage, TP rank) parameters, weight / gradient / optimizer
memory, model FLOPs; step time at a stated MFU, pipeline bubble, throughput. `tools/plan.py` prints it.

Activation memory is not estimated yet (it needs calibrating against measured runs): the plan says so
instead of guessing.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

from megaloop.config import Config
from megaloop.planner.flops import bubble_fraction, stage_flops, step_estimate
from megaloop.planner.memory import recipe, state_bytes
from megaloop.planner.params import stage_params, stage_parts, total_params

GIB = 1024 ** 3
ACTIVATIONS = "not estimated yet"


@dataclass(frozen=True)
class GPU:
    name: str
    peak_flops: float  # dense bf16 FLOP/s of one device
    mem_gib: float
    bw: float  # HBM bytes/s

    def to_dict(self) -> dict:
        return asdict(self)


GPUS = {
    "h100": GPU("h100", 989e12, 80.0, 3.35e12),
    "h200": GPU("h200", 989e12, 141.0, 4.8e12),
    "a100": GPU("a100", 312e12, 80.0, 2.0e12),
}


def parse_gpu(spec: str) -> GPU:
    """A preset name (h100 | h200 | a100) or NAME:peak_flops:mem_gib:bw (bw in bytes/s)."""
    if spec.lower() in GPUS:
        return GPUS[spec.lower()]
    fields = spec.split(":")
    if len(fields) != 4:
        raise ValueError(f"--gpu {spec!r}: a preset ({', '.join(GPUS)}) or NAME:peak_flops:mem_gib:bw")
    try:
        return GPU(fields[0], float(fields[1]), float(fields[2]), float(fields[3]))
    except ValueError:
        raise ValueError(f"--gpu {spec!r}: peak_flops, mem_gib and bw must be numbers") from None


def make_plan(cfg: Config, world: Optional[int] = None, gpu: GPU = GPUS["h100"], mfu: float = 0.4,
              tokens: Optional[float] = None) -> dict:
    p, t = cfg.parallel, cfg.train
    tp, pp = p.tensor_parallel, p.pipeline_parallel
    world = tp * pp if world is None else int(world)
    if world < 1 or world % (tp * pp):
        raise ValueError(f"world size {world} is not a multiple of tensor_parallel x pipeline_parallel = {tp * pp}")
    if not 0 < mfu <= 1:
        raise ValueError(f"mfu must be in (0, 1], got {mfu}")
    dp = world // (tp * pp)
    parts = stage_parts(cfg, pp, tp)
    fl = stage_flops(cfg, parts)
    rows = []
    for sp in stage_params(cfg, pp, tp):
        mem = state_bytes(sp.params, t.precision, t.bf16_impl, p.zero_stage, dp)
        rows.append({
            "stage": sp.stage, "tp_rank": sp.tp_rank, "layers": sp.by_layer, "params": sp.params,
            "memory_bytes": mem.to_dict(), "states_gib": mem.total / GIB,
            "activations": ACTIVATIONS,
            "model_flops_per_token": fl["stage_model_flops_per_token"][sp.stage] / tp,
        })
    seq = cfg.data.seq_len
    micro = t.grad_accum_steps  # micro-batches per pipeline per step
    tokens_per_step = t.micro_batch_size * micro * dp * seq
    step_s = step_estimate(fl["train_flops_per_token"], tokens_per_step, world, gpu.peak_flops, mfu)
    tokens = float(t.steps * tokens_per_step if tokens is None else tokens)
    weights = fl["stage_weight"]
    plan = {
        "config": {"arch": cfg.model.arch, "precision": recipe(t.precision, t.bf16_impl), "zero_stage": p.zero_stage,
                   "seq_len": seq, "micro_batch_size": t.micro_batch_size, "grad_accum_steps": micro,
                   "activation_checkpointing": t.activation_checkpointing,
                   "pipeline_partition": p.pipeline_partition},
        "gpu": gpu.to_dict(),
        "world": world, "tp": tp, "pp": pp, "dp": dp,
        "total_params": total_params(cfg),
        "stage_parts": parts,
        "loops": {"expected_total": fl["loops_total"], "expected_grad": fl["loops_grad"]},
        "train_flops_per_token": fl["train_flops_per_token"],
        "stage_model_flops_per_token": fl["stage_model_flops_per_token"],
        "stage_imbalance": max(weights) / (sum(weights) / len(weights)),
        "ranks": rows,
        "activations": ACTIVATIONS,
        "mfu": mfu,
        "tokens_per_step": tokens_per_step,
        "step_time_s": step_s,
        "bubble_fraction": bubble_fraction(pp, micro),
        "tokens_per_s": tokens_per_step / step_s,
        "tokens_per_s_per_gpu": tokens_per_step / step_s / world,
        "target_tokens": tokens,
        "time_to_target_s": tokens / (tokens_per_step / step_s),
    }
    return plan


def _si(x: float, unit: str = "") -> str:
    for div, pre in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:.3g}{pre}{unit}"
    return f"{x:.3g}{unit}"


def _duration(s: float) -> str:
    if s >= 86400:
        return f"{s / 86400:.2f} days"
    if s >= 3600:
        return f"{s / 3600:.2f} h"
    return f"{s:.1f} s"


def _table(header, rows) -> list:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    fmt = lambda r: "  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
    return [fmt(header), fmt(["-" * w for w in widths]), *[fmt(r) for r in rows]]


def _compact(keys) -> str:
    """["embedding", "prelude[0]", "prelude[1]", "loop"] -> "embedding,prelude[0-1],loop"."""
    out, i = [], 0
    while i < len(keys):
        k = keys[i]
        if "[" not in k:
            out.append(k)
            i += 1
            continue
        base, j = k.split("[")[0], i
        while j + 1 < len(keys) and keys[j + 1].startswith(base + "["):
            j += 1
        first, last = k.split("[")[1][:-1], keys[j].split("[")[1][:-1]
        out.append(k if j == i else f"{base}[{first}-{last}]")
        i = j + 1
    return ",".join(out)


def format_plan(plan: dict) -> str:
    g, c = plan["gpu"], plan["config"]
    lines = [f"{c['arch']}: {plan['total_params'] / 1e6:.1f}M parameters; world {plan['world']} x {g['name']} "
             f"= TP {plan['tp']} x PP {plan['pp']} x DP {plan['dp']}; {c['precision']}, ZeRO {c['zero_stage']}",
             f"loops per micro-batch: E[R] = {plan['loops']['expected_total']:.3g} "
             f"({plan['loops']['expected_grad']:.3g} with gradients); pipeline parts {plan['stage_parts']} "
             f"({c['pipeline_partition']})", ""]
    header = ["stage", "tp", "layers", "params", "weights", "grads", "master", "grad acc", "optimizer",
              "states", "% mem", "activations", "GFLOP/token"]
    rows = []
    for r in plan["ranks"]:
        m = r["memory_bytes"]
        gib = lambda b: f"{b / 1024 ** 3:.2f}G"
        layers = _compact(list(r["layers"]))
        rows.append([r["stage"], r["tp_rank"], layers, f"{r['params']:,}", gib(m["weights"]), gib(m["grads"]),
                     gib(m["master"]), gib(m["grad_accum"]), gib(m["optimizer"]), gib(m["total"]),
                     f"{100 * r['states_gib'] / g['mem_gib']:.1f}", r["activations"],
                     f"{r['model_flops_per_token'] / 1e9:.3f}"])
    lines += _table(header, rows)
    lines += ["",
              "memory: weights + gradients + optimizer states only (GiB per rank; % of the "
              f"{g['mem_gib']:g} GiB of one {g['name']}); activations {plan['activations']}",
              f"model FLOPs per token {_si(plan['train_flops_per_token'], 'FLOP')}; stage imbalance (heaviest / "
              f"mean, with recompute) {plan['stage_imbalance']:.3f}; pipeline bubble (p-1)/(m+p-1) = "
              f"{plan['bubble_fraction']:.3f} (m = {c['grad_accum_steps']} micro-batches)",
              f"at MFU {plan['mfu']:.2f} of {_si(g['peak_flops'], 'FLOP/s')} per GPU (bubble and imbalance included): "
              f"step {plan['step_time_s']:.3f} s for {plan['tokens_per_step']:,} tokens; "
              f"{_si(plan['tokens_per_s_per_gpu'])} tokens/s per GPU, {_si(plan['tokens_per_s'])} tokens/s cluster; "
              f"{_si(plan['target_tokens'])} tokens in {_duration(plan['time_to_target_s'])}"]
    return "\n".join(lines)
