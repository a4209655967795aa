"""A cluster plan of one config: per (pipeline stage, TP rank) parameters, weight / gradient / optimizer
memory, activation memory (megaloop/planner/activations.py: the micro-batches a 1F1B stage keeps in
flight, R and the activation checkpointing mode), TP communication (comm.py), model FLOPs; step time at
a stated MFU, pipeline bubble, throughput. `tools/plan.py` prints it.

Per-rank memory = states + activations. Not counted: the CUDA context and NCCL / DeepSpeed buffers
(~1-3 GiB per GPU), allocator fragmentation, attention-kernel workspaces.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Optional

from megaloop.config import Config
from megaloop.errors import UsageError
from megaloop.planner.activations import activation_bytes, stage_names
from megaloop.planner.comm import stage_tp_comm
from megaloop.planner.flops import bubble_fraction, stage_flops, step_estimate
from megaloop.planner.host import host_load_bytes
from megaloop.planner.memory import recipe, state_bytes
from megaloop.planner.params import largest_param, stage_params, stage_parts, total_params

GIB = 1024 ** 3


def _receives(cfg: Config, names) -> int:
    """Tensors a stage that does not start the model receives per micro-batch: the stream, and e
    while the looped block that reads it is still ahead (FLT family, injection, internal recall)."""
    m = cfg.model
    needs_e = m.arch != "recurrent" or m.injection != "none" or m.recall == "internal"
    return 1 + int(needs_e and "loop" in names)


@dataclass(frozen=True)
class GPU:
    name: str
    peak_flops: float  # dense bf16 FLOP/s of one device
    mem_gib: float
    bw: float  # HBM bytes/s
    link_bw: float = 450e9  # NVLink bytes/s per direction (TP collectives inside a node)
    net_bw: float = 50e9  # inter-node bytes/s per GPU (400 Gb/s InfiniBand / RoCE)

    def to_dict(self) -> dict:
        return asdict(self)


GPUS = {
    "h100": GPU("h100", 989e12, 80.0, 3.35e12),
    "h200": GPU("h200", 989e12, 141.0, 4.8e12),
    "a100": GPU("a100", 312e12, 80.0, 2.0e12, 300e9, 25e9),
}


def parse_gpu(spec: str) -> GPU:
    """A preset name (h100 | h200 | a100) or NAME:peak_flops:mem_gib:bw (bw in bytes/s)."""
    if spec.lower() in GPUS:
        return GPUS[spec.lower()]
    fields = spec.split(":")
    if len(fields) != 4:
        raise ValueError(f"--gpu {spec!r}: a preset ({', '.join(GPUS)}) or NAME:peak_flops:mem_gib:bw")
    try:
        values = [float(v) for v in fields[1:]]
    except ValueError:
        raise ValueError(f"--gpu {spec!r}: peak_flops, mem_gib and bw must be numbers") from None
    bad = [name for name, v in zip(("peak_flops", "mem_gib", "bw"), values) if not (math.isfinite(v) and v > 0)]
    if bad:
        raise UsageError(f"--gpu {spec!r}: {', '.join(bad)} must be "
                         + ("a positive finite number" if len(bad) == 1 else "positive finite numbers")
                         + " (e.g. X:989e12:80:3.35e12)")
    return GPU(fields[0], *values)


def _cached(cache: Optional[dict], key, fn):
    if cache is None:
        return fn()
    if key not in cache:
        cache[key] = fn()
    return cache[key]


def make_plan(cfg: Config, world: Optional[int] = None, gpu: GPU = GPUS["h100"], mfu: float = 0.4,
              tokens: Optional[float] = None, cache: Optional[dict] = None,
              gpus_per_node: Optional[int] = None) -> dict:
    """The plan of `cfg` on `world` GPUs (gpus_per_node: default 8, for the host memory per node). cache: a
    dict shared by calls on variants of one model (the search), keeping the meta-device parameter counts
    per (TP, PP, partition)."""
    p, t = cfg.parallel, cfg.train
    tp, pp = p.tensor_parallel, p.pipeline_parallel
    world = tp * pp if world is None else int(world)
    if world < 1 or world % (tp * pp):
        raise ValueError(f"world size {world} is not a multiple of tensor_parallel x pipeline_parallel = {tp * pp}")
    if not 0 < mfu <= 1:
        raise ValueError(f"mfu must be in (0, 1], got {mfu}")
    if tokens is not None and not (math.isfinite(tokens) and tokens > 0):
        raise UsageError(f"--tokens {tokens:g}: the token budget must be a positive finite number")
    dp = world // (tp * pp)
    ac = t.activation_checkpointing
    parts = _cached(cache, ("parts", tp, pp, ac), lambda: stage_parts(cfg, pp, tp))
    fl = _cached(cache, ("flops", ac, tuple(parts)), lambda: stage_flops(cfg, parts))
    rows = []
    micro = t.grad_accum_steps  # micro-batches per pipeline per step
    for sp in _cached(cache, ("params", tp, tuple(parts)), lambda: stage_params(cfg, pp, tp)):
        mem = state_bytes(sp.params, t.precision, t.bf16_impl, p.zero_stage, dp,
                          sp.muon_params if t.optimizer == "muon" else 0)
        names = stage_names(cfg, parts[sp.stage], parts[sp.stage + 1])
        in_flight = min(pp - sp.stage, micro)
        tied = 0
        if cfg.model.tie_embeddings and "embedding" in names and "head" in names:
            tied = sp.by_layer.get("embedding", 0)
        act = activation_bytes(cfg, names, tp=tp, device="cuda", loop_params=sp.by_layer.get("loop", 0),
                               tied_params=tied, matrix_params=sp.params, in_flight=in_flight,
                               receives=_receives(cfg, names) if sp.stage > 0 else 0)
        comm = stage_tp_comm(cfg, names, tp, fl["loops_total"], fl["loops_grad"])
        total = mem.total + act["peak"]
        rows.append({
            "stage": sp.stage, "tp_rank": sp.tp_rank, "layers": sp.by_layer, "params": sp.params,
            "memory_bytes": mem.to_dict(), "states_gib": mem.total / GIB,
            "activations": {"peak_bytes": act["peak"], "micro_batch_saved_bytes": act["saved"],
                            "in_flight": in_flight, "R": act["R"], "grad_loops": act["G"],
                            "autocast_weight_bytes": act["autocast_weights"],
                            "grad_buffer_bytes": act["grad_buffers"]},
            "activations_gib": act["peak"] / GIB,
            "total_gib": total / GIB,
            "fits": total / GIB <= gpu.mem_gib,
            "tp_comm_bytes_per_step": {k: v * micro for k, v in comm.items()},
            "model_flops_per_token": fl["stage_model_flops_per_token"][sp.stage] / tp,
        })
    seq = cfg.data.seq_len
    tokens_per_step = t.micro_batch_size * micro * dp * seq
    step_s = step_estimate(fl["train_flops_per_token"], tokens_per_step, world, gpu.peak_flops, mfu)
    tokens = float(t.steps * tokens_per_step if tokens is None else tokens)
    weights = fl["stage_weight"]
    total = _cached(cache, ("total",), lambda: total_params(cfg))
    largest = _cached(cache, ("largest",), lambda: largest_param(cfg))
    host = host_load_bytes(largest, max(r["params"] for r in rows), t.precision, t.bf16_impl, p.zero_stage, dp,
                           min(world, gpus_per_node or 8))
    plan = {
        "config": {"arch": cfg.model.arch, "precision": recipe(t.precision, t.bf16_impl), "zero_stage": p.zero_stage,
                   "seq_len": seq, "micro_batch_size": t.micro_batch_size, "grad_accum_steps": micro,
                   "activation_checkpointing": t.activation_checkpointing,
                   "pipeline_partition": p.pipeline_partition},
        "gpu": gpu.to_dict(),
        "world": world, "tp": tp, "pp": pp, "dp": dp,
        "total_params": total,
        "stage_parts": parts,
        "loops": {"expected_total": fl["loops_total"], "expected_grad": fl["loops_grad"]},
        "train_flops_per_token": fl["train_flops_per_token"],
        "stage_model_flops_per_token": fl["stage_model_flops_per_token"],
        "stage_imbalance": max(weights) / (sum(weights) / len(weights)),
        "ranks": rows,
        "max_rank_gib": max(r["total_gib"] for r in rows),
        "fits": all(r["fits"] for r in rows),
        "host_memory": host,
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


def _bytes(b: float) -> str:
    return f"{b / 1024 ** 3:.2f}G" if b >= 1024 ** 3 / 100 else f"{b / 1024 ** 2:.1f}M"


def _host_line(h: dict) -> str:
    return (f"host memory at start / resume (megaloop/planner/host.py): {h['per_node_bytes'] / GIB:.1f} GiB per node "
            f"({h['ranks_per_node']} ranks x {h['per_rank_bytes'] / GIB:.2f} GiB): each rank materialises its own "
            f"parameters one at a time (the largest drawn at full size: {h['build_bytes_per_rank'] / GIB:.2f} GiB, "
            f"transient; init.from reads its source the same way) and reads at most its own share of a checkpoint "
            f"({h['resume_bytes_per_rank'] / GIB:.2f} GiB; another layout: one parameter at a time, memory-mapped); "
            f"page cache of the files not counted")


def format_plan(plan: dict) -> str:
    g, c = plan["gpu"], plan["config"]
    r0 = plan["ranks"][0]["activations"]
    lines = [f"{c['arch']}: {plan['total_params'] / 1e6:.1f}M parameters; world {plan['world']} x {g['name']} "
             f"= TP {plan['tp']} x PP {plan['pp']} x DP {plan['dp']}; {c['precision']}, ZeRO {c['zero_stage']}, "
             f"activation checkpointing {c['activation_checkpointing']}, micro-batch {c['micro_batch_size']} x "
             f"{c['seq_len']}",
             f"loops per micro-batch: E[R] = {plan['loops']['expected_total']:.3g} "
             f"({plan['loops']['expected_grad']:.3g} with gradients); memory sized for R = {r0['R']} "
             f"({r0['grad_loops']} with gradients); pipeline parts {plan['stage_parts']} ({c['pipeline_partition']})",
             ""]
    header = ["stage", "tp", "layers", "params", "weights", "grads", "master", "grad acc", "optimizer",
              "states", "activations", "in flight", "total", "% mem", "TP comm/step", "GFLOP/token"]
    rows = []
    for r in plan["ranks"]:
        m, a = r["memory_bytes"], r["activations"]
        comm = r["tp_comm_bytes_per_step"]["total"]
        rows.append([r["stage"], r["tp_rank"], _compact(list(r["layers"])), f"{r['params']:,}",
                     _bytes(m["weights"]), _bytes(m["grads"]), _bytes(m["master"]), _bytes(m["grad_accum"]),
                     _bytes(m["optimizer"]), _bytes(m["total"]), _bytes(a["peak_bytes"]), a["in_flight"],
                     f"{r['total_gib']:.2f}G", f"{100 * r['total_gib'] / g['mem_gib']:.1f}"
                     + ("" if r["fits"] else " !"), _bytes(comm) if comm else "-",
                     f"{r['model_flops_per_token'] / 1e9:.3f}"])
    lines += _table(header, rows)
    verdict = (f"fits: the largest rank needs {plan['max_rank_gib']:.1f} GiB of {g['mem_gib']:g}" if plan["fits"] else
               f"DOES NOT FIT: the largest rank needs {plan['max_rank_gib']:.1f} GiB of {g['mem_gib']:g} (!)")
    lines += ["",
              f"memory per rank (GiB): states (weights + gradients + optimizer) + activations (peak of "
              f"'in flight' micro-batches' saved tensors and the backward transients); {verdict}; not counted: "
              f"CUDA context, NCCL / DeepSpeed buffers, allocator fragmentation, attention workspaces "
              f"(leave 5-10%)",
              _host_line(plan["host_memory"]),
              f"model FLOPs per token {_si(plan['train_flops_per_token'], 'FLOP')}; stage imbalance (heaviest / "
              f"mean, with recompute) {plan['stage_imbalance']:.3f}; pipeline bubble (p-1)/(m+p-1) = "
              f"{plan['bubble_fraction']:.3f} (m = {c['grad_accum_steps']} micro-batches)",
              f"at MFU {plan['mfu']:.2f} of {_si(g['peak_flops'], 'FLOP/s')} per GPU (bubble and imbalance included): "
              f"step {plan['step_time_s']:.3f} s for {plan['tokens_per_step']:,} tokens; "
              f"{_si(plan['tokens_per_s_per_gpu'])} tokens/s per GPU, {_si(plan['tokens_per_s'])} tokens/s cluster; "
              f"{_si(plan['target_tokens'])} tokens in {_duration(plan['time_to_target_s'])}"]
    return "\n".join(lines)
