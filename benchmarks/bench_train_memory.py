"""Peak memory of one training step under DeepSpeed (one rank, PP = 1) for R = 1, 4, 8, 12 loops with
activation checkpointing per loop, per layer, and off.

Each (R, mode) runs in a fresh process (peak RSS is a per-process high-water mark) with glibc's mmap
threshold lowered so that freed activations leave the RSS at once. Reported: the step's peak RSS
above the RSS just before it (weights and the interpreter excluded), i.e. activations + gradients +
AdamW state (~6 MiB at the default size) + transient buffers. On a GPU the same is measured with the
accelerator's max_memory_allocated.

    DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 python benchmarks/bench_train_memory.py [--d 128 --seq 512 --batch 4]

Goal: with per-loop checkpointing the step's memory at R = 12 stays close to R = 1 (one loop's
activations are alive at a time, plus R saved loop inputs of B x T x d each).
"""
import argparse
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def one(args):
    import resource

    import torch

    from megaloop.config import load_config
    from megaloop.model import build_model
    from megaloop.training.distributed import init_distributed
    from megaloop.training.ds_config import build_ds_config
    from megaloop.training.optim import build_optimizer

    import deepspeed
    from deepspeed.accelerator import get_accelerator

    torch.set_num_threads(1)
    init_distributed(120)
    cfg = load_config(None, [f"model.d_model={args.d}", "model.n_heads=4", f"model.max_seq_len={args.seq}",
                             f"data.seq_len={args.seq}", "model.n_loop=2", "model.arch=flt", "model.vocab_size=258",
                             f"train.micro_batch_size={args.batch}", f"train.activation_checkpointing={args.mode}"])
    torch.manual_seed(0)
    model = build_model(cfg)
    model.block.activation_checkpointing = args.mode
    opt = build_optimizer(model, cfg.train)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=build_ds_config(cfg, 1))
    acc = get_accelerator()
    dev = engine.device
    tokens = torch.randint(0, 258, (args.batch, args.seq), device=dev)
    # One step from a settled state. (ru_maxrss is a lifetime high-water mark, so there is no
    # warm-up step; gradients and AdamW state of this ~0.5M-parameter model are ~6 MiB.)
    if acc.device_name() == "cpu":
        import gc
        import psutil
        gc.collect()
        before = psutil.Process().memory_info().rss
    else:
        acc.synchronize()
        acc.reset_peak_memory_stats()
        before = acc.memory_allocated()
    out = engine(tokens, labels=tokens, loops=args.loops)
    engine.backward(out.loss)
    engine.step()
    if acc.device_name() == "cpu":
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    else:
        acc.synchronize()
        peak = acc.max_memory_allocated()
    print(json.dumps({"R": args.loops, "mode": args.mode, "step_peak_bytes": peak - before, "peak_bytes": peak}))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--loops-list", default="1,4,8,12")
    ap.add_argument("--modes", default="loop,layer,none")
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--loops", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--mode", default="none", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        return one(args)
    # glibc: serve blocks >= 64 KiB by mmap so that freed activations leave the RSS immediately and
    # the RSS high-water mark tracks live memory (else freed-but-cached heap pages inflate it).
    env = dict(os.environ, OMP_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    env.setdefault("DS_ACCELERATOR", "cpu")
    rows = []
    for mode in args.modes.split(","):
        for R in [int(r) for r in args.loops_list.split(",")]:
            out = subprocess.run([sys.executable, __file__, "--one", "--loops", str(R), "--mode", mode, "--d", str(args.d),
                                  "--seq", str(args.seq), "--batch", str(args.batch)], env=env, capture_output=True,
                                 text=True, timeout=600)
            line = [l for l in out.stdout.splitlines() if l.startswith("{")]
            if not line:
                print(out.stdout[-2000:], out.stderr[-2000:])
                raise SystemExit(f"run R={R} mode={mode} failed")
            rows.append(json.loads(line[-1]))
            print(f"mode {mode:5s} R {R:2d}: step peak {rows[-1]['step_peak_bytes'] / 2**20:8.1f} MiB "
                  f"(process peak {rows[-1]['peak_bytes'] / 2**20:7.1f} MiB)", flush=True)
    print(f"\nd={args.d} seq={args.seq} batch={args.batch} n_loop=2 (FLT), one rank, DeepSpeed engine, fp32")
    print("step peak memory above the pre-step level (MiB):")
    Rs = [int(r) for r in args.loops_list.split(",")]
    print("mode   " + "".join(f"  R={R:<6d}" for R in Rs))
    for mode in args.modes.split(","):
        vals = {r["R"]: r["step_peak_bytes"] / 2**20 for r in rows if r["mode"] == mode}
        print(f"{mode:6s} " + "".join(f"  {vals[R]:8.1f}" for R in Rs))


if __name__ == "__main__":
    main()
