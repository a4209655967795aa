"""Token mixers inside a looped block: forward+backward time and activation memory vs sequence length.

Each row runs one looped model (prelude 0, n_loop layers, R loops, coda 0) whose looped layers all use
one mixer: softmax attention ("attn"), Gated DeltaNet ("gdn"), sliding-window ("swa") or DeepSeek
sparse attention ("dsa"), plus the "4:1" GDN/attention hybrid when n_loop allows. Memory is the bytes
autograd saves for backward (distinct storages, via saved_tensors_hooks): repeatable on CPU, unlike RSS;
it does not include transient buffers. The crossover is the first length at which a mixer is faster
than softmax attention.

    python benchmarks/bench_mixers_looped.py --lengths 512,1024,2048,4096,8192 --loops 2
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.bench_loop_overhead import saved_activation_bytes  # noqa: E402
from megaloop.config import load_config  # noqa: E402
from megaloop.model import build_model  # noqa: E402


def run(mixer, T, args):
    cfg = load_config(None, [
        f"model.mixer={mixer}", f"model.d_model={args.d_model}", f"model.n_heads={args.heads}",
        f"model.n_kv_heads={args.kv_heads}", f"model.n_loop={args.n_loop}", f"model.loops={args.loops}",
        f"model.max_seq_len={T}", f"data.seq_len={min(T, 128)}", f"model.window={args.window}",
        f"model.dsa_topk={args.topk}", "model.vocab_size=258"])
    torch.manual_seed(0)
    model = build_model(cfg)
    x = torch.randint(0, 258, (1, T))
    y = torch.randint(0, 258, (1, T))

    def step():
        t0 = time.perf_counter()
        model(x, labels=y).loss.backward()
        return time.perf_counter() - t0

    step()
    times = [step() for _ in range(args.repeats)]
    _, saved = saved_activation_bytes(lambda: model(x, labels=y))
    return min(times), saved


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", default="512,1024,2048,4096,8192")
    ap.add_argument("--mixers", default="attn,gdn,swa,dsa")
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--n-loop", type=int, default=2)
    ap.add_argument("--loops", type=int, default=2)
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--topk", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    lengths = [int(v) for v in args.lengths.split(",")]
    mixers = args.mixers.split(",")
    print(f"d_model {args.d_model}, heads {args.heads}/{args.kv_heads} kv, {args.n_loop} looped layers x "
          f"{args.loops} loops, window {args.window}, top-k {args.topk}, batch 1, fwd+bwd, best of {args.repeats}")
    print(f"{'mixer':6s} " + " ".join(f"{T:>16d}" for T in lengths) + "   (ms | saved MiB)")
    results = {}
    for m in mixers:
        row = []
        for T in lengths:
            t, mem = run(m, T, args)
            results[(m, T)] = t
            row.append(f"{t * 1e3:8.0f} | {mem / 2**20:5.0f}")
        print(f"{m:6s} " + " ".join(f"{c:>16s}" for c in row), flush=True)
    if "attn" in mixers:
        for m in mixers:
            if m == "attn":
                continue
            cross = next((T for T in lengths if results[(m, T)] < results[("attn", T)]), None)
            print(f"crossover {m} vs attn: {cross if cross else 'none up to ' + str(lengths[-1])}")


if __name__ == "__main__":
    main()
