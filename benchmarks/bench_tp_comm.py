"""Bytes communicated per training step by tensor parallelism, counted vs. analytic.

Runs TP ranks as spawned gloo processes on CPU, one forward + backward per (config, R), and counts
what goes through the TP collectives (`TPComm.counting()`), beside the analytic figure:

  per transformer layer and loop iteration:  forward 2 all-reduces of B*T*d (g after wo and w2)
                                             backward 2 all-reduces of B*T*d (f before q/k/v, w1/w3)
                                             (+ B*T*d in backward where FLT feeds the query stream
                                             through the same wq: fused into the same all-reduce)
  once per step: embedding g (fwd, B*T*d), LM head f (bwd, B*T*d), vocab-parallel CE (fwd, 3*B*T fp32)
  loops run under no_grad (truncated backprop) have forward traffic only.

"payload" is the size of the tensors handed to the collectives; "wire" is what one rank sends with
a ring algorithm (all-reduce 2(n-1)/n x payload).

    OMP_NUM_THREADS=1 DS_ACCELERATOR=cpu .venv/bin/python benchmarks/bench_tp_comm.py \
        [--configs lt flt parcae] [--loops 1 4 8] [--tp 2] [--batch 4] [--seq 64]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def analytic(cfg, B, T, R, G, tp, elem=4):
    m = cfg.model
    act = B * T * m.d_model * elem
    L, P, C = m.n_loop, m.n_prelude, m.n_coda
    fwd = act * (1 + 2 * (P + L * R + C)) + 3 * B * T * 4
    q_layers = {"flt": L, "lt_ia": 1}.get(m.arch, 0)
    q_loops = G if G < R else max(G - 1, 0)  # loop 0 has no previous-loop query stream
    bwd = act * (2 * (P + L * G + C) + 1) + act * q_layers * q_loops
    count_fwd = 1 + 2 * (P + L * R + C) + 2
    count_bwd = 2 * (P + L * G + C) + 1
    ring = 2 * (tp - 1) / tp
    return dict(fwd=fwd, bwd=bwd, count_fwd=count_fwd, count_bwd=count_bwd, wire=(fwd + bwd) * ring)


def _rank(rank, world, names, loops, B, T):
    import torch
    from megaloop.config import ParallelConfig, load_config
    from megaloop.model import build_model
    from megaloop.model.loop_schedule import grad_loops
    from megaloop.parallel import apply_tensor_parallel, build_parallel_state

    state = build_parallel_state(ParallelConfig(tensor_parallel=world))
    rows = []
    for name in names:
        cfg = load_config(ROOT / f"yaml_configs/tiny/{name}.yaml",
                          [f"model.max_seq_len={max(T, 16)}", f"data.seq_len={T}"])
        torch.manual_seed(0)
        model = apply_tensor_parallel(build_model(cfg), state)
        g = torch.Generator().manual_seed(0)
        x = torch.randint(0, cfg.model.vocab_size, (B, T), generator=g)
        y = torch.randint(0, cfg.model.vocab_size, (B, T), generator=g)
        for R in loops:
            G = grad_loops(cfg.loop, R)
            t0 = time.perf_counter()
            with model.tp_comm.counting() as c:
                model(x, labels=y, loops=R, grad_loops=G).loss.backward()
            dt = time.perf_counter() - t0
            model.zero_grad(set_to_none=True)
            rows.append(dict(name=name, R=R, G=G, fwd=c.payload_bytes(phase="forward"),
                             bwd=c.payload_bytes(phase="backward"), count_fwd=c.count(phase="forward"),
                             count_bwd=c.count(phase="backward"), wire=c.wire_bytes(), seconds=dt,
                             a=analytic(cfg, B, T, R, G, world)))
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", nargs="+", default=["lt", "flt", "parcae", "lt2_gdn"])
    ap.add_argument("--loops", nargs="+", type=int, default=[1, 4, 8])
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=64)
    args = ap.parse_args(argv)
    from dist_utils import run_distributed

    rows = run_distributed(_rank, world_size=args.tp, args=(args.configs, args.loops, args.batch, args.seq),
                           timeout=600)[0]
    print(f"TP={args.tp}, B={args.batch}, T={args.seq}, fp32; bytes per step (forward + backward), per rank")
    hdr = (f"{'config':10} {'R':>3} {'G':>3} {'#fwd':>5} {'#bwd':>5} {'fwd payload':>12} {'analytic':>12} "
           f"{'bwd payload':>12} {'analytic':>12} {'ring wire':>12} {'analytic':>12} {'step s':>7}")
    print(hdr)
    print("-" * len(hdr))
    ok = True
    for r in rows:
        a = r["a"]
        match = (r["fwd"] == a["fwd"] and r["bwd"] == a["bwd"] and r["count_fwd"] == a["count_fwd"]
                 and r["count_bwd"] == a["count_bwd"])
        ok &= match
        print(f"{r['name']:10} {r['R']:>3} {r['G']:>3} {r['count_fwd']:>5} {r['count_bwd']:>5} {r['fwd']:>12,} "
              f"{a['fwd']:>12,} {r['bwd']:>12,} {a['bwd']:>12,} {r['wire']:>12,.0f} {a['wire']:>12,.0f} "
              f"{r['seconds']:>7.3f}{'' if match else '  MISMATCH'}")
    print("counted == analytic for every row" if ok else "SOME ROWS DIFFER FROM THE ANALYTIC FIGURE")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
