"""What one diagnostic step of `train.diag_interval` costs, against one training micro-batch.

Times, on one micro-batch of a config (its tiny config by default), a training forward + backward and
each training diagnostic (megaloop/training/diagnostics.py: the loop map's spectral norm, the input
dependence, the per-loop gradient contributions), and prints each one's time as a multiple of the
micro-batch's forward + backward. Timing: process CPU time on CPU (steadier on a shared machine), wall
time with synchronize() on accelerators; best of --repeats. On accelerators also the peak memory of each
above what was allocated before it.

    python benchmarks/bench_diagnostics.py [--config yaml_configs/tiny/lt.yaml] [--loops 4] [--batch 4]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None):
    import torch
    from megaloop.config import load_config
    from megaloop.model import build_model
    from megaloop.model.fixed_point import input_dependence, loop_map_spectral_norm, per_loop_grads
    from megaloop.training.diagnostics import LANCZOS_STEPS

    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default=str(Path(__file__).resolve().parents[1] / "yaml_configs/tiny/lt.yaml"))
    ap.add_argument("--loops", type=int, default=4)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args(argv)
    cfg = load_config(a.config, a.overrides)
    dev = torch.device(a.device)
    torch.manual_seed(0)
    model = build_model(cfg).to(dev)
    T = a.seq_len or cfg.data.seq_len
    x = torch.randint(0, cfg.model.vocab_size, (a.batch, T + 1), device=dev)
    tokens, labels = x[:, :-1], x[:, 1:]
    R = a.loops
    cuda = dev.type == "cuda"

    def timed(fn):
        best, peak = float("inf"), None
        for _ in range(a.repeats):
            if cuda:
                torch.cuda.synchronize()
                base = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
                t0 = time.perf_counter()
            else:
                t0 = time.process_time()
            fn()
            if cuda:
                torch.cuda.synchronize()
                best = min(best, time.perf_counter() - t0)
                peak = torch.cuda.max_memory_allocated() - base
            else:
                best = min(best, time.process_time() - t0)
        return best, peak

    def train_step():
        model.zero_grad(set_to_none=True)
        model(tokens, labels=labels, loops=R).loss.backward()
        model.zero_grad(set_to_none=True)

    model.eval()
    rows = [("forward+backward (one micro-batch)", timed(train_step))]
    rows.append((f"spectral norm ({LANCZOS_STEPS} Lanczos steps)",
                 timed(lambda: loop_map_spectral_norm(model, tokens, R, iters=LANCZOS_STEPS))))
    rows.append(("input dependence", timed(lambda: input_dependence(model, tokens, R))))
    rows.append(("per-loop gradient contributions", timed(lambda: per_loop_grads(model, tokens, labels, R))))
    base = rows[0][1][0]
    print(f"{Path(a.config).stem}: d_model {cfg.model.d_model}, n_loop {cfg.model.n_loop}, R {R}, "
          f"batch {a.batch} x {T}, {dev.type}")
    for name, (t, peak) in rows:
        mem = f", peak +{peak / 2**20:.1f} MiB" if peak is not None else ""
        print(f"  {name:40s} {t * 1e3:9.1f} ms  {t / base:5.2f}x{mem}")
    total = sum(t for _, (t, _) in rows[1:])
    print(f"  all diagnostics: {total / base:.2f}x one micro-batch's forward+backward")


if __name__ == "__main__":
    main()
