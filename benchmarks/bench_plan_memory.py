"""Activation memory of real training steps, measured, beside the planner's prediction
(megaloop/planner/activations.py), across architectures, R, activation checkpointing, micro-batch and
sequence length.

What is measured (CPU): the exact live bytes of tensors, not the RSS. A TorchDispatchMode sees every
tensor an aten op creates during the step (forward, loss, backward, checkpoint recomputation), keys it
by its storage and drops it when the storage is freed (a weakref finalizer). The peak of that sum over
the forward + backward of one micro-batch is the step's activation peak: saved activations, outputs
held by the caller (logits), recomputed loops / layers, gradient buffers in flight. The model runs in
its steady state (one warm-up step first; gradients kept allocated with zero_grad(set_to_none=False)),
so weights, gradients and AdamW state - which the planner counts separately - are not in the figure.
The optimizer step itself is not measured (its foreach temporaries are parameter-sized, not activations).
"saved" is what is alive right after the loss is computed (before backward).

On a GPU (an accelerator other than cpu) the same step is measured with the accelerator's
max_memory_allocated() - memory_allocated() before the step, which adds allocator rounding and the
attention kernels' workspaces.

    DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 python benchmarks/bench_plan_memory.py [--quick] [--json]
    python benchmarks/bench_plan_memory.py --configs flt lt --loops 1 4 --modes none loop layer \
        --batch 2 4 --seq 64 128 [--precision fp32 bf16]
    # on a GPU (the H200 reference points of issue 16; activations only, states excluded):
    python benchmarks/bench_plan_memory.py --configs yaml_configs/flt_350m_8gpu.yaml --loops 4 \
        --modes none loop --batch 8 --seq 2048 --precision bf16

--configs takes tiny config names (yaml_configs/tiny/NAME.yaml) or paths to YAML files.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import weakref

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_flatten  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _strided(t) -> bool:
    """Dense tensors (sparse ones, e.g. DSA's selection pattern, have no single storage: not counted)."""
    return isinstance(t, torch.Tensor) and t.layout == torch.strided


class LiveBytes(TorchDispatchMode):
    """Live bytes of the storages created by aten ops under this mode, and their peak (an op output
    sharing an input's storage - a view, an in-place result - is not a new allocation)."""

    def __init__(self):
        super().__init__()
        self.live, self.current, self.peak = {}, 0, 0

    def _free(self, key):
        self.current -= self.live.pop(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage()._cdata for t in tree_flatten((args, kwargs))[0] if _strided(t)}
        for t in tree_flatten(out)[0]:
            if _strided(t) and t.device.type == "cpu":
                st = t.untyped_storage()
                key, n = st._cdata, st.nbytes()
                if n and key not in self.live and key not in inputs:  # a view / in-place result: not new
                    self.live[key] = n
                    self.current += n
                    self.peak = max(self.peak, self.current)
                    weakref.finalize(st, self._free, key)
        return out


def tiny_config(name: str, R: int, mode: str, batch: int, seq: int, precision: str = "fp32", extra=()):
    from megaloop.config import load_config

    path = name if name.endswith(".yaml") else os.path.join(ROOT, "yaml_configs", "tiny", f"{name}.yaml")
    return load_config(path,
                       [f"model.max_seq_len={max(seq, 16)}", f"data.seq_len={seq}", f"train.micro_batch_size={batch}",
                        f"train.activation_checkpointing={mode}", f"train.precision={precision}",
                        "loop.sampling=fixed", f"loop.mean={R}", f"model.loops={R}",
                        f"model.max_loops={max(R, 16)}", *extra])


def measure(cfg, device: str = "cpu", tp_group=None) -> dict:
    """Activation bytes of one training micro-batch of `cfg` (PP 1; TP when tp_group is given: this
    rank's): {'saved', 'peak'}."""
    from megaloop.model import build_model
    from megaloop.model.loop_schedule import grad_loops

    t = cfg.train
    torch.manual_seed(0)
    model = build_model(cfg).to(device)
    if tp_group is not None:
        from megaloop.parallel.apply_tp import apply_tensor_parallel

        model = apply_tensor_parallel(model, tp_group, sequence_parallel=cfg.parallel.sequence_parallel)
    model.block.activation_checkpointing = t.activation_checkpointing
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    R = int(cfg.loop.mean)
    G = grad_loops(cfg.loop, R)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.model.vocab_size, (t.micro_batch_size, cfg.data.seq_len), generator=g).to(device)
    autocast = torch.autocast(torch.device(device).type, dtype=torch.bfloat16,
                              enabled=t.precision == "bf16")

    def step():
        with autocast:
            out = model(tokens, labels=tokens, loops=R, grad_loops=G)
        return out

    out = step()
    out.loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=False)
    del out
    if device == "cpu":
        with LiveBytes() as live:
            out = step()
            saved = live.current
            out.loss.backward()
            del out
        return {"saved": saved, "peak": live.peak}
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    acc.synchronize()
    acc.reset_peak_memory_stats()
    before = acc.memory_allocated()
    out = step()
    acc.synchronize()
    saved = acc.memory_allocated() - before
    out.loss.backward()
    del out
    acc.synchronize()
    return {"saved": saved, "peak": acc.max_memory_allocated() - before}


def planned(cfg, device: str = "cpu", tp: int = 1) -> dict:
    from megaloop.planner.activations import activation_bytes, model_counts
    from megaloop.planner.params import meta_model

    a = activation_bytes(cfg, tp=tp, device=device, **model_counts(meta_model(cfg, tp, 0)))
    return {"saved": a["saved"], "peak": a["peak"]}


def _tp_rank(rank, world, points):
    """One TP rank (spawned, gloo): the measured bytes of each point."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    return [measure(tiny_config(*p), "cpu", dist.group.WORLD) for p in points]


def measure_tp(points, tp: int) -> list:
    """Per point, the largest rank's measurement with TP = tp (ranks as CPU processes)."""
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from dist_utils import run_distributed

    per_rank = run_distributed(_tp_rank, world_size=tp, args=(points,), timeout=1200)
    return [{k: max(r[i][k] for r in per_rank) for k in ("saved", "peak")} for i in range(len(points))]


def grid(args):
    return list(itertools.product(args.configs, args.loops, args.modes, args.batch, args.seq, args.precision))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", nargs="+",
                    default=["plain", "lt", "flt", "flt_res", "lt_ia", "lt_i", "parcae", "ouro", "huginn", "inject_add",
                             "inject_internal", "lt2_gates", "swa", "lt2_gdn", "lt2_hybrid", "lt2_gdn_dsa"])
    ap.add_argument("--loops", nargs="+", type=int, default=[1, 4])
    ap.add_argument("--modes", nargs="+", default=["none", "loop", "layer"])
    ap.add_argument("--batch", nargs="+", type=int, default=[2])
    ap.add_argument("--seq", nargs="+", type=int, default=[64])
    ap.add_argument("--precision", nargs="+", default=["fp32"])
    ap.add_argument("--tp", type=int, default=1, help="tensor parallelism (CPU ranks as processes, gloo)")
    ap.add_argument("--sequence-parallel", action="store_true", help="with --tp: parallel.sequence_parallel=true")
    ap.add_argument("--quick", action="store_true", help="flt and lt only, R 1 and 4")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if args.quick:
        args.configs = ["flt", "lt"]
    device = "cpu"
    if os.environ.get("DS_ACCELERATOR", "cpu") != "cpu":
        from deepspeed.accelerator import get_accelerator

        device = get_accelerator().device_name()
    torch.set_num_threads(1)
    rows = []
    head = f"{'config':16s} {'prec':5s} {'R':>3s} {'AC':5s} {'B':>3s} {'T':>5s} {'measured MiB':>12s} " \
           f"{'planned MiB':>12s} {'error':>7s}   {'saved meas/plan MiB':>20s}"
    if not args.json:
        print(f"activation peak of one micro-batch on {device}, TP {args.tp} (forward + backward, above the "
              f"steady state; the largest rank)")
        print(head)
    points = grid(args)
    tp_extra = [f"parallel.tensor_parallel={args.tp}"] if args.tp > 1 else []
    if args.tp > 1 and args.sequence_parallel:
        tp_extra.append("parallel.sequence_parallel=true")
    points = [(*pt, tp_extra) for pt in points]
    tp_measured = measure_tp(points, args.tp) if args.tp > 1 else None
    for i, (name, R, mode, B, T, prec, extra) in enumerate(points):
        cfg = tiny_config(name, R, mode, B, T, prec, extra)
        m = tp_measured[i] if tp_measured else measure(cfg, device)
        p = planned(cfg, device, args.tp)
        err = p["peak"] / m["peak"] - 1
        name = os.path.basename(name).removesuffix(".yaml")
        rows.append({"config": name, "precision": prec, "R": R, "mode": mode, "batch": B, "seq": T,
                     "measured": m, "planned": p, "error": err})
        if not args.json:
            print(f"{name:16s} {prec:5s} {R:3d} {mode:5s} {B:3d} {T:5d} {m['peak'] / 2**20:12.3f} "
                  f"{p['peak'] / 2**20:12.3f} {100 * err:+6.1f}%   {m['saved'] / 2**20:9.3f}/{p['saved'] / 2**20:.3f}",
                  flush=True)
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        errs = [abs(r["error"]) for r in rows]
        print(f"{len(rows)} points: mean |error| {100 * sum(errs) / len(errs):.1f}%, max {100 * max(errs):.1f}%")
    return rows


if __name__ == "__main__":
    main()
