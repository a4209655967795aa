"""Does looping cost more per token than a plain transformer of the same effective depth?

For each architecture's tiny config, times forward+backward at R = 1, 4, 12 and compares it with a
plain (non-looped) transformer built from the same layer code with n_loop * R layers, measured in the
same run, interleaved so machine noise hits both alike. Memory is the bytes the autograd graph holds
for backward at the end of the forward (summed over saved tensors, via saved_tensors_hooks): exact
and repeatable on CPU, unlike RSS.

    python benchmarks/bench_loop_overhead.py [--archs lt,flt] [--loops 1,4,12] [--repeats 7]

Prints one row per (arch, R): tokens/s of the looped model, of the plain one, their ratio
(goal >= 0.95) and the activation memory of each. Timing: process CPU time, best of --repeats
interleaved blocks of steps, each block at least 0.25 s. Read the R = 1 rows as the noise floor: there
the looped and the plain model do identical work.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from megaloop.config import load_config  # noqa: E402
from megaloop.model import build_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ARCHS = ["lt", "inject_add", "inject_internal", "huginn", "parcae", "flt", "lt_i", "lt_ia", "flt_res",
         "ouro", "lt2_gates"]


def saved_activation_bytes(fn) -> int:
    """Bytes of all tensors autograd saves for backward while fn runs (distinct storages)."""
    seen = {}

    def pack(t):
        try:
            key = t.untyped_storage().data_ptr()
            seen[key] = max(seen.get(key, 0), t.untyped_storage().nbytes())
        except RuntimeError:
            pass
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(seen.values())


def step_time(model, x, y, loops, min_seconds=0.25):
    """Process CPU seconds per fwd+bwd step (one thread), over a block of steps lasting at least
    min_seconds: CPU time is less disturbed than wall time by other work on a shared machine, and
    single steps of a few ms are dominated by timer and allocator noise."""
    n, t0 = 0, time.process_time()
    while True:
        model(x, labels=y, loops=loops).loss.backward()
        n += 1
        elapsed = time.process_time() - t0
        if elapsed >= min_seconds:
            return elapsed / n


def bench(arch: str, loops: int, batch: int, seq: int, repeats: int):
    cfg = load_config(ROOT / f"yaml_configs/tiny/{arch}.yaml", [f"data.seq_len={seq}", f"model.max_seq_len={seq}"])
    torch.manual_seed(0)
    looped = build_model(cfg)
    # The reference: same layer code, same width, n_loop * R distinct layers, run once. We keep the
    # architecture's own layer options (norm style, MLP, qk-norm) but no looping machinery.
    plain_cfg = load_config(None, [
        f"model.vocab_size={cfg.model.vocab_size}", f"model.d_model={cfg.model.d_model}",
        f"model.n_heads={cfg.model.n_heads}", f"model.n_kv_heads={cfg.model.kv_heads}",
        f"model.mlp={cfg.model.mlp}", f"model.norm_style={cfg.model.norm_style}",
        f"model.qk_norm={cfg.model.qk_norm}", f"model.max_seq_len={seq}", f"data.seq_len={seq}",
        f"model.n_prelude={cfg.model.n_prelude}", f"model.n_coda={cfg.model.n_coda}",
        f"model.n_loop={cfg.model.n_loop * loops}", "model.loops=1"])
    plain = build_model(plain_cfg)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, cfg.model.vocab_size, (batch, seq), generator=g)
    y = torch.randint(0, cfg.model.vocab_size, (batch, seq), generator=g)
    step_time(looped, x, y, loops)  # warm-up
    step_time(plain, x, y, 1)
    t_loop, t_plain = [], []
    for _ in range(repeats):  # interleaved, so slow phases of the machine hit both
        t_loop.append(step_time(looped, x, y, loops))
        t_plain.append(step_time(plain, x, y, 1))
    _, mem_loop = saved_activation_bytes(lambda: looped(x, labels=y, loops=loops))
    _, mem_plain = saved_activation_bytes(lambda: plain(x, labels=y, loops=1))
    tokens = batch * seq
    # The minimum over blocks: the run least disturbed by the rest of the machine.
    return tokens / min(t_loop), tokens / min(t_plain), mem_loop, mem_plain


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--archs", default=",".join(ARCHS))
    ap.add_argument("--loops", default="1,4,12")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, batch {args.batch} x seq {args.seq}, "
          f"fwd+bwd CPU time, best of {args.repeats} interleaved blocks of >= 0.25 s")
    print(f"{'arch':16s} {'R':>3s} {'looped tok/s':>13s} {'plain tok/s':>12s} {'ratio':>6s} "
          f"{'looped act MiB':>15s} {'plain act MiB':>14s}")
    for arch in args.archs.split(","):
        for r in [int(v) for v in args.loops.split(",")]:
            tl, tp, ml, mp = bench(arch, r, args.batch, args.seq, args.repeats)
            print(f"{arch:16s} {r:3d} {tl:13.0f} {tp:12.0f} {tl / tp:6.3f} {ml / 2**20:15.2f} {mp / 2**20:14.2f}",
                  flush=True)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
