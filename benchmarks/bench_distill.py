"""The cost of the distillation teacher (train.distill): step time and memory of one training step of a GDN-hybrid
student under DeepSpeed (one rank, PP = 1), alone (cross-entropy) and with its frozen softmax-attention teacher
beside it (megaloop.training.distill.Distiller: the warm-up's per-loop KL, and the final-loop KL after it).

Each mode runs in a fresh process (peak RSS is a per-process high-water mark; glibc's mmap threshold lowered so
freed activations leave the RSS at once). Reported per mode: the resident memory the set-up added (weights,
AdamW state, the teacher), the peak RSS of one step above the RSS just before it (activations, gradients,
transient buffers), and the median step time over --steps steps after 2 warm-up steps.

    DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 python benchmarks/bench_distill.py [--d 128 --seq 256 --batch 4 --loops 4]
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def _overrides(args, mixer):
    return [f"model.d_model={args.d}", "model.n_heads=4", f"model.max_seq_len={args.seq}", f"data.seq_len={args.seq}",
            "model.n_loop=2", f"model.loops={args.loops}", "model.vocab_size=258", f"model.mixer={mixer}",
            f"train.micro_batch_size={args.batch}", "model.gdn_kernel=torch"]


def one(args):
    import gc

    import psutil
    import torch

    from megaloop.config import load_config
    from megaloop.model import build_model
    from megaloop.training.distributed import init_distributed
    from megaloop.training.ds_config import build_ds_config
    from megaloop.training.optim import build_optimizer

    import deepspeed

    torch.set_num_threads(1)
    init_distributed(120)
    proc = psutil.Process()
    gc.collect()
    rss0 = proc.memory_info().rss
    teacher_path = os.path.join(args.tmp, "teacher.pt")
    cfg = load_config(None, _overrides(args, "gdn,attn") +
                      ([f"train.distill.teacher={teacher_path}", "train.distill.warmup_steps=1000000"]
                       if args.mode != "alone" else []))
    torch.manual_seed(0)
    model = build_model(cfg)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=build_optimizer(model, cfg.train),
                                           config=build_ds_config(cfg, 1))
    distiller = None
    if args.mode != "alone":
        from megaloop.training.distill import Distiller
        distiller = Distiller(cfg, model, engine.device, console=lambda s: None)
        if args.mode == "final":
            cfg.train.distill.warmup_steps = 0
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 258, (args.batch, args.seq), generator=g)
    labels = torch.randint(0, 258, (args.batch, args.seq), generator=g)

    def step():
        if distiller is None:
            loss = engine(tokens, labels=labels, loops=args.loops).loss
        else:
            loss = distiller.loss(engine, tokens, labels, args.loops, None, 0)[0]
        engine.backward(loss)
        engine.step()
        return float(loss)

    step()
    step()
    gc.collect()
    rss_before = proc.memory_info().rss
    import resource
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    times.sort()
    out = {"mode": args.mode, "setup_mib": (rss_before - rss0) / 2 ** 20,
           "step_peak_mib": max(0, peak - rss_before) / 2 ** 20, "step_ms": 1000 * times[len(times) // 2],
           "student_params": sum(p.numel() for p in model.parameters()),
           "teacher_params": sum(p.numel() for p in distiller.teacher.parameters()) if distiller else 0}
    print("RESULT " + json.dumps(out), flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--loops", type=int, default=4)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--mode", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--tmp", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.mode:
        return one(args)
    import torch
    from megaloop.checkpoint import save_plain_checkpoint
    from megaloop.config import load_config
    from megaloop.model import build_model
    with tempfile.TemporaryDirectory() as tmp:
        tcfg = load_config(None, _overrides(args, "attn"))
        torch.manual_seed(1)
        save_plain_checkpoint(build_model(tcfg), tcfg, os.path.join(tmp, "teacher.pt"))
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(64 * 1024), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(29000 + os.getpid() % 1000), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        rows = []
        for mode in ("alone", "warmup", "final"):
            cmd = [sys.executable, __file__, "--mode", mode, "--tmp", tmp] + [
                f"--{k}={getattr(args, k)}" for k in ("d", "seq", "batch", "loops", "steps")]
            res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
            line = [ln for ln in res.stdout.splitlines() if ln.startswith("RESULT ")]
            if not line:
                raise SystemExit(f"{mode} failed:\n{res.stdout[-2000:]}\n{res.stderr[-3000:]}")
            rows.append(json.loads(line[0][7:]))
    print(f"student: GDN hybrid gdn,attn x R={args.loops}, d={args.d}, seq {args.seq}, batch {args.batch}, "
          f"{rows[0]['student_params'] / 1e6:.2f}M params; teacher: the same shape in softmax attention, "
          f"{rows[1]['teacher_params'] / 1e6:.2f}M params (fp32, CPU, one rank)")
    print(f"{'mode':<34} {'set-up RSS MiB':>15} {'step peak MiB':>14} {'step ms':>9}")
    names = {"alone": "student alone (CE)", "warmup": "+ teacher, per-loop KL (warm-up)",
             "final": "+ teacher, final-loop KL"}
    for r in rows:
        print(f"{names[r['mode']]:<34} {r['setup_mib']:>15.1f} {r['step_peak_mib']:>14.1f} {r['step_ms']:>9.1f}")
    base = rows[0]["step_ms"]
    print("step time vs alone: " + ", ".join(f"{names[r['mode']]} x{r['step_ms'] / base:.2f}" for r in rows[1:]))


if __name__ == "__main__":
    main()
