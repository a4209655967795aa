"""Forward+backward cost of the sequence-mixer kernels versus sequence length.

    .venv/bin/python benchmarks/bench_mixers_ops.py [--lengths 512 1024 2048 4096 8192]

    .venv/bin/python benchmarks/bench_mixers_ops.py --device cuda --dtype bfloat16 --lengths 2048 8192 32768

Mixers (B=1, H=4, D=32 by default, float32 unless --dtype, on CPU or whatever device --device names):
  softmax  F.scaled_dot_product_attention(is_causal=True)          O(T^2) time
  gdn      megaloop.ops.gated_delta_rule (chunk 64), the dispatcher training uses (--gdn-kernel, default
           auto): on CPU exactly gated_delta_rule_chunked; on a GPU flash-linear-attention when it passes
           its probe, else the chunked form under torch.compile (the kernel taken is printed)   O(T) time
  swa      megaloop.ops.sliding_window_attention (window 256)        O(T w)
  dsa      lightning indexer top-k (no grad) + top-k sparse attention (topk 256)
           O(T^2) blockwise indexer (Hi=4, Di=16, cheap per pair; top-k over the keys above a
           bound from strided group maxima, no (T, T) tensor)
           + O(T k) attention with a recomputing backward (on CPU: sampled_addmm scores and
           embedding_bag weighted sums, key-side gradients over the key-sorted selection)
  dsa-attn the DSA attention alone, given the selected indices

On an accelerator (--device cuda, ...) the device is synchronized (DeepSpeed's accelerator abstraction) before
the clock starts and after each backward (kernels run asynchronously: without it the time is the launch
time), and "peak MB" is the device allocator's peak over one pass above what was allocated before it.

What is measured, per (mixer, T), in fresh subprocesses so allocations do not leak between runs:
  time      best (minimum) wall-clock of `reps` forward+backward passes after one warm-up pass,
            backward seeded with ones, 1 intra-op thread by default (--threads): robust to other
            jobs sharing the machine, which only ever add time. The median is printed beside it.
  saved MB  bytes autograd keeps for backward (torch.autograd.graph.saved_tensors_hooks,
            deduplicated by storage, the inputs themselves excluded): the activation memory
            a training step holds per layer. DSA's attention (a custom autograd
            Function) saves its output, a log-sum-exp per (query, head) and the (T, topk)
            selection (~T*topk*9 bytes: 18 MB at T=8192, topk=256).
  peak MB   peak RSS during one forward+backward pass minus RSS before it (the kernel's
            high-water mark VmHWM, reset through /proc/self/clear_refs; ru_maxrss growth where
            that is unavailable), after a small warm-up run, in a separate process where
            glibc mmaps every allocation >= 64 KiB (MALLOC_MMAP_THRESHOLD_) so freed buffers
            really leave RSS (not used for timing: it page-faults on every allocation). Includes transient
            buffers and allocator overhead; approximate (page granularity, ~1 MB noise).
Note: on CPU, SDPA runs a flash-attention style kernel, so softmax attention's *memory* is
already O(T); what grows quadratically for it is time.
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

MIXERS = ["softmax", "gdn", "swa", "dsa", "dsa-attn"]


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def build(mixer: str, T: int, args):
    """Inputs (leaves requiring grad) and a forward function for one mixer at length T."""
    import torch
    import torch.nn.functional as F

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    from megaloop.ops.gated_delta import gated_delta_rule
    from megaloop.ops.lightning_indexer import lightning_indexer_topk
    from megaloop.ops.sliding_window import sliding_window_attention
    from megaloop.ops.sparse_attention import sparse_attention_from_indices

    torch.manual_seed(0)
    device, B, H, D = args.device, 1, args.heads, args.head_dim
    dtype = getattr(torch, args.dtype)

    if mixer == "gdn":
        q = F.normalize(torch.randn(B, T, H, D, device=device, dtype=dtype), dim=-1)
        k = F.normalize(torch.randn(B, T, H, D, device=device, dtype=dtype), dim=-1)
        v = torch.randn(B, T, H, D, device=device, dtype=dtype)
        g = -F.softplus(torch.randn(B, T, H, device=device, dtype=dtype))
        beta = torch.rand(B, T, H, device=device, dtype=dtype)
        inputs = [q, k, v, g, beta]

        def forward(q, k, v, g, beta):
            return gated_delta_rule(q, k, v, g, beta, chunk_size=args.chunk_size, kernel=args.gdn_kernel)[0]
    else:
        Hkv = args.kv_heads or H
        inputs = [torch.randn(B, h, T, D, device=device, dtype=dtype) for h in (H, Hkv, Hkv)]
        if mixer == "softmax":
            def forward(q, k, v):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        elif mixer == "swa":
            def forward(q, k, v):
                return sliding_window_attention(q, k, v, args.window)
        else:
            Hi, Di = args.indexer_heads, args.indexer_dim
            q_idx = torch.randn(B, T, Hi, Di, device=device, dtype=dtype)
            k_idx = torch.randn(B, T, Di, device=device, dtype=dtype)
            w = torch.randn(B, T, Hi, device=device, dtype=dtype)
            if mixer == "dsa":
                def forward(q, k, v):
                    indices, valid = lightning_indexer_topk(q_idx, k_idx, w, args.topk)
                    return sparse_attention_from_indices(q, k, v, indices, valid)
            else:  # dsa-attn: selection precomputed, outside the timed region
                indices, valid = lightning_indexer_topk(q_idx, k_idx, w, args.topk)

                def forward(q, k, v):
                    return sparse_attention_from_indices(q, k, v, indices, valid)

    return forward, [x.requires_grad_(True) for x in inputs]


def accelerator_for(device: str):
    """DeepSpeed's accelerator when `device` is not the CPU (None on CPU, where kernels run synchronously and
    memory is measured as RSS); refuses a device that is not the accelerator's."""
    import torch

    if torch.device(device).type == "cpu":
        return None
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    if acc.device_name() != torch.device(device).type:
        raise SystemExit(f"--device {device}: DeepSpeed's accelerator is {acc.device_name()!r} "
                         f"(DS_ACCELERATOR={os.environ.get('DS_ACCELERATOR', 'unset')}); run where that device is")
    return acc


def run_worker(mixer: str, T: int, args) -> dict:
    import torch

    acc = accelerator_for(args.device)
    sync = acc.synchronize if acc is not None else (lambda: None)

    def forward_backward(forward, leaves):
        for x in leaves:
            x.grad = None
        out = forward(*leaves)
        out.backward(torch.ones_like(out))
        sync()

    # One small run first: thread pools, kernel dispatch tables and allocator arenas are set up
    # there, so the peak-RSS growth below is the length-T run's own memory.
    forward_backward(*build(mixer, 256, args))
    forward, leaves = build(mixer, T, args)

    kernel = {}
    if mixer == "gdn":  # (after the runs above: the dispatcher has made and cached its choice)
        from megaloop.ops.gated_delta import kernel_in_use

        kernel = {"kernel": kernel_in_use(args.gdn_kernel, args.device, getattr(torch, args.dtype), args.head_dim,
                                          args.head_dim)}
    if args.measure == "memory":
        if acc is not None:  # the device allocator's peak over one pass, above what was allocated before it
            before = acc.memory_allocated()
            acc.reset_peak_memory_stats()
            forward_backward(forward, leaves)
            peak_kib = (acc.max_memory_allocated() - before) / 1024
        elif _reset_peak_rss():  # peak of this pass alone, whatever ran before (e.g. building inputs)
            rss_before = _rss_kib("VmRSS")
            forward_backward(forward, leaves)
            peak_kib = _rss_kib("VmHWM") - rss_before
        else:  # growth of the process's lifetime peak: a lower bound if set-up peaked higher
            rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
            forward_backward(forward, leaves)
            peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before

        # Saved-for-backward bytes, on a separate forward whose graph is then dropped.
        input_storages = {x.untyped_storage().data_ptr() for x in leaves}
        saved = {}

        def pack(t):
            storage = t.untyped_storage()
            if storage.data_ptr() not in input_storages:
                saved[storage.data_ptr()] = storage.nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = forward(*leaves)
        del out
        return {"saved_mb": sum(saved.values()) / 2**20, "peak_mb": peak_kib / 1024, **kernel}

    forward_backward(forward, leaves)  # warm-up (also torch.compile's, for a compiled GDN)
    times = []
    for _ in range(args.reps):
        sync()
        start = time.perf_counter()
        forward_backward(forward, leaves)
        times.append(time.perf_counter() - start)
    # The minimum, not the median: on a shared machine interference only ever adds time.
    return {"time_ms": 1e3 * min(times), "median_ms": 1e3 * statistics.median(times), **kernel}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192])
    parser.add_argument("--mixers", nargs="+", default=MIXERS, choices=MIXERS)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=0, help="kv heads of the attention mixers (0: = heads)")
    parser.add_argument("--chunk-size", type=int, default=64)
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--topk", type=int, default=256)
    parser.add_argument("--indexer-heads", type=int, default=4)
    parser.add_argument("--indexer-dim", type=int, default=16)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    parser.add_argument("--gdn-kernel", choices=["auto", "fla", "torch"], default="auto",
                        help="megaloop.ops.gated_delta_rule's kernel (as model.gdn_kernel)")
    parser.add_argument("--worker", nargs=2, metavar=("MIXER", "T"), help=argparse.SUPPRESS)
    parser.add_argument("--measure", choices=["time", "memory"], help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main():
    args = parse_args()

    if args.worker:
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        result = run_worker(args.worker[0], int(args.worker[1]), args)
        print(json.dumps(result))
        return

    # Memory runs make glibc mmap (and on free, unmap) every allocation >= 64 KiB so that RSS
    # follows the live bytes; that costs a page fault per allocation, so timing runs separately.
    memory_env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(64 * 1024))
    forwarded = sys.argv[1:]

    def worker(mixer, T, measure, env):
        proc = subprocess.run(
            [sys.executable, os.path.abspath(__file__), *forwarded, "--worker", mixer, str(T), "--measure", measure],
            env=env, capture_output=True, text=True, check=True,
        )
        return json.loads(proc.stdout.strip().splitlines()[-1])

    results = {}
    import torch

    print(f"B=1 H={args.heads} Hkv={args.kv_heads or args.heads} D={args.head_dim} {args.dtype} on {args.device}, torch {torch.__version__}, "
          f"{args.threads or torch.get_num_threads()} threads; fwd+bwd, best of {args.reps}; "
          f"gdn chunk {args.chunk_size}, swa window {args.window}, dsa topk {args.topk} "
          f"(indexer {args.indexer_heads} heads x {args.indexer_dim})")
    print(f"load average at start: {os.getloadavg()[0]:.2f}")
    print(f"{'mixer':>9} {'T':>6} {'time ms':>9} {'median':>9} {'saved MB':>9} {'peak MB':>8}")
    for T in args.lengths:
        for mixer in args.mixers:
            r = {**worker(mixer, T, "time", os.environ), **worker(mixer, T, "memory", memory_env)}
            results[mixer, T] = r
            print(f"{mixer:>9} {T:>6} {r['time_ms']:>9.1f} {r['median_ms']:>9.1f} {r['saved_mb']:>9.1f} {r['peak_mb']:>8.1f}"
                  + (f"  (GDN kernel: {r['kernel']})" if "kernel" in r else ""), flush=True)

    print(f"load average at end: {os.getloadavg()[0]:.2f}")
    if "softmax" in args.mixers:
        print("\nspeed-up over softmax (softmax best time / mixer best time):")
        print(f"{'mixer':>9} " + " ".join(f"{T:>7}" for T in args.lengths) + "   crossover")
        for mixer in args.mixers:
            if mixer == "softmax":
                continue
            ratios = [results["softmax", T]["time_ms"] / results[mixer, T]["time_ms"] for T in args.lengths]
            faster = [T for T, r in zip(args.lengths, ratios) if r > 1.0]
            # Crossover: first measured length from which the mixer stays faster.
            crossover = next((T for i, T in enumerate(args.lengths) if all(r > 1.0 for r in ratios[i:])), None)
            where = f"T >= {crossover}" if crossover else ("not within range" if not faster else "unstable")
            print(f"{mixer:>9} " + " ".join(f"{r:>7.2f}" for r in ratios) + f"   {where}")


if __name__ == "__main__":
    main()
