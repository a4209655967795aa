"""Tokens/s of megaloop's DeepSpeed training step against a plain PyTorch loop of the same model, one rank.

The DeepSpeed side is exactly what `pretrain_looped.py` runs per optimizer step: a `Trainer` is set up
from the config (on a small synthetic token dataset: `Trainer.setup()` builds the engine, the optimizer
from `build_optimizer`, the per-loop / per-layer activation checkpointing, `train.compile`, the bf16
recipe and, for ZeRO 0 with fp32 / bf16 autocast, the trainer's own gradient clipping in an optimizer
pre-step hook), and every timed step is `Trainer.train_step(...)` plus the run loop's per-step reads
(`grad_norm()`, `engine.get_lr()`), fed host-side micro-batches like the data loader's.

The plain side is the usual PyTorch recipe on the same model (same seed, same weights): pinned host
batch -> non-blocking copy, forward under torch.autocast (bf16) or fp32, backward,
`clip_grad_norm_(1.0)`, AdamW from megaloop's `build_optimizer` (fused on CUDA), LR-scheduler step,
`zero_grad(set_to_none=True)`; same activation checkpointing and compile settings.

Timing: blocks of --steps optimizer steps, one `synchronize()` at the end of each block (no host syncs
inside a block on either side beyond what the code under test does itself), blocks alternating
plain / DeepSpeed --repeats times, median reported. Wall time on accelerators; on cpu, process CPU time
(less disturbed by other work on a shared machine). Peak memory per side on accelerators.

    # the issue's figure: FLT 350M (d 1024, 24 shared layers), micro-batch 8 x 2048, bf16, R = 1 and 4
    python benchmarks/bench_train_overhead.py --preset flt350m --precision bf16 --ac loop [--compile]
    # tiny, on CPU
    DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 python benchmarks/bench_train_overhead.py --device cpu
    # any YAML config, with overrides
    python benchmarks/bench_train_overhead.py --config yaml_configs/parcae_770m_8gpu.yaml model.loops=8

Target (issue 10): DeepSpeed >= 0.95 x plain tokens/s at R = 1.
"""
import argparse
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)

PRESETS = {
    # small FLT: seconds on a CPU
    "tiny": (None, ["model.arch=flt", "model.d_model=128", "model.n_heads=4", "model.n_loop=2", "model.vocab_size=258",
                    "model.max_seq_len=256", "data.seq_len=256", "train.micro_batch_size=8"]),
    # the shape: FLT 350M, d 1024, 24 shared layers, micro-batch 8 x 2048, R = 4, one GPU
    "flt350m": ("yaml_configs/flt_350m_8gpu.yaml", ["train.micro_batch_size=8", "data.seq_len=2048"]),
}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    ap.add_argument("--config", default=None, help="YAML config instead of the preset's (its shape is used)")
    ap.add_argument("--device", default=None,
                    help="cpu or the accelerator (default: DeepSpeed's accelerator); cpu sets DS_ACCELERATOR=cpu")
    ap.add_argument("--precision", choices=["fp32", "bf16"], default=None,
                    help="default: bf16 on accelerators, fp32 on cpu. bf16: torch.autocast on the plain side; "
                         "train.bf16_impl (--bf16-impl) on the DeepSpeed side")
    ap.add_argument("--bf16-impl", choices=["autocast", "master_weights"], default="autocast")
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                    help="train.compile: torch.compile each transformer layer (both sides)")
    ap.add_argument("--ac", choices=["loop", "layer", "none"], default="loop", help="activation checkpointing")
    ap.add_argument("--optimizer-impl", choices=["auto", "fused", "foreach", "for_loop"], default="auto")
    ap.add_argument("--zero", type=int, default=0)
    ap.add_argument("--loops", default="1,4", help="comma list of R")
    ap.add_argument("--batch", type=int, default=None, help="micro-batch size (default: the preset's)")
    ap.add_argument("--seq", type=int, default=None, help="sequence length (default: the preset's)")
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps per timed block (default 10 on "
                                                             "accelerators, 5 on cpu)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps per side and R (compile happens here)")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    ap.add_argument("overrides", nargs="*", help="section.key=value config overrides")
    return ap.parse_args(argv)


def write_synthetic_dataset(prefix: str, vocab: int, seq: int, n_docs: int = 16) -> None:
    """A small Megatron-format token dataset: `Trainer.setup()` builds its data pipeline from one. The
    timed steps are fed by the benchmark's own batches."""
    import numpy as np
    from megaloop.data.indexed_dataset import IndexedDatasetWriter, token_dtype_for_vocab
    rng = np.random.default_rng(0)
    with IndexedDatasetWriter(prefix, token_dtype_for_vocab(vocab)) as w:
        for _ in range(n_docs):
            w.add_document(rng.integers(0, vocab, size=4 * (seq + 1)))


def main(argv=None):
    args = parse_args(argv)
    if args.device == "cpu":
        os.environ["DS_ACCELERATOR"] = "cpu"
    import torch
    import deepspeed  # noqa: F401
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    device_type = acc.device_name()
    if args.device is not None and torch.device(args.device).type != device_type:
        sys.exit(f"--device {args.device}: DeepSpeed's accelerator here is '{device_type}' (the DeepSpeed side "
                 f"runs on it); set DS_ACCELERATOR or pass --device {device_type}")
    on_cpu = device_type == "cpu"
    precision = args.precision or ("fp32" if on_cpu else "bf16")
    steps = args.steps or (5 if on_cpu else 10)
    loops = [int(r) for r in args.loops.split(",")]
    torch.set_num_threads(max(1, args.threads))

    from megaloop.config import load_config
    from megaloop.model import build_model
    from megaloop.model.compile import compile_layers, is_compiled
    from megaloop.training.optim import build_optimizer, build_scheduler, optimizer_kernel
    from megaloop.training.trainer import Trainer

    yaml_path, preset = PRESETS[args.preset]
    yaml_path = args.config or (os.path.join(ROOT, yaml_path) if yaml_path else None)
    tmp = tempfile.TemporaryDirectory(prefix="bench_train_overhead_")
    shape = list(preset) if args.config is None else []
    if args.batch:
        shape.append(f"train.micro_batch_size={args.batch}")
    if args.seq:
        shape += [f"data.seq_len={args.seq}", f"model.max_seq_len={args.seq}"]
    total_steps = len(loops) * (2 * args.warmup + 2 * args.repeats * steps) + 10
    run = [f"train.precision={precision}", f"train.bf16_impl={args.bf16_impl}", f"train.compile={args.compile}",
           f"train.activation_checkpointing={args.ac}", f"train.optimizer_impl={args.optimizer_impl}",
           f"parallel.zero_stage={args.zero}", "parallel.tensor_parallel=1", "parallel.pipeline_parallel=1",
           "train.grad_accum_steps=1", f"train.steps={total_steps}", "train.eval_interval=0",
           "train.save_interval=0", "train.tensorboard=false", "train.log_interval=1000000", "train.grad_clip=1.0",
           f"train.output_dir={tmp.name}/run", "data.tokenizer_type=byte", "data.tokenizer_model=null",
           f"data.data_path=[{tmp.name}/synthetic]", "data.split=1000,0,0", f"data.cache_dir={tmp.name}/cache",
           "loop.sampling=fixed", f"loop.mean={max(loops)}", f"loop.max={max(loops + [1])}"]
    cfg = load_config(yaml_path, shape + run + list(args.overrides))
    m, t = cfg.model, cfg.train
    B, T = t.micro_batch_size, cfg.data.seq_len
    write_synthetic_dataset(f"{tmp.name}/synthetic", min(m.vocab_size, 258), T)

    # --- DeepSpeed side: the trainer's own setup and step ---
    trainer = Trainer(cfg)
    trainer.setup()
    note = ""
    if t.compile and not is_compiled(trainer.module):  # (a trainer without train.compile support)
        compile_layers(trainer.module, mode=t.compile_mode)
        note = " (compiled by the benchmark: this Trainer ignores train.compile)"
    trainer.engine.train()
    device = trainer.engine.device

    # --- plain side: same model, same weights ---
    torch.manual_seed(t.seed)
    plain = build_model(cfg)
    plain.block.activation_checkpointing = args.ac
    plain.to(device)
    if t.compile:
        compile_layers(plain, mode=t.compile_mode)
    plain.train()
    opt = build_optimizer(plain, t, device_type)
    sched = build_scheduler(opt, t)
    params = [p for p in plain.parameters() if p.requires_grad]
    autocast = torch.autocast(device_type, dtype=torch.bfloat16, enabled=precision == "bf16")

    gen = torch.Generator().manual_seed(1)
    n_batches = 4
    host = [torch.randint(0, m.vocab_size, (B, T + 1), generator=gen) for _ in range(n_batches)]
    host = [(x[:, :-1].contiguous(), x[:, 1:].contiguous()) for x in host]
    pinned = [(x.pin_memory(), y.pin_memory()) for x, y in host] if not on_cpu else host

    def plain_block(R, n, k0=0):
        loss = None
        for i in range(n):
            x, y = pinned[(k0 + i) % n_batches]
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with autocast:
                out = plain(x, labels=y, loops=R)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(params, t.grad_clip, foreach=True)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            loss = out.loss.detach()
        return loss

    step_counter = [0]

    def ds_block(R, n, k0=0):
        def batches():  # what TrainBatches yields: host tensors ((tokens, [R_total, R_grad]), labels)
            i = k0
            while True:
                x, y = host[i % n_batches]
                i += 1
                yield (x, torch.tensor([R, R], dtype=torch.long)), y
        it = batches()
        loss = None
        for _ in range(n):
            loss, _, _ = trainer.train_step(it, step_counter[0], False)
            step_counter[0] += 1
            trainer.grad_norm()  # the run loop's per-step reads (device tensors, no host sync)
            trainer.engine.get_lr()
        return loss

    def timed(fn, R):
        acc.synchronize()
        if not on_cpu:
            acc.reset_peak_memory_stats()
        clock = time.process_time if on_cpu else time.perf_counter
        t0 = clock()
        loss = fn(R, steps)
        acc.synchronize()
        dt = clock() - t0
        peak = acc.max_memory_allocated() if not on_cpu else None
        return steps * B * T / dt, peak, loss

    kernel = optimizer_kernel(t.optimizer_impl, device_type)
    recipe = {"bf16": f"bf16 ({args.bf16_impl} on the DeepSpeed side, autocast plain)"}.get(precision, precision)
    print(f"device {device} ({device_type}), torch {torch.__version__}, deepspeed {deepspeed.__version__}"
          + (f", {torch.get_num_threads()} thread(s)" if on_cpu else ""))
    print(f"model: {args.config or args.preset}, arch {m.arch}, d {m.d_model}, {m.n_loop} looped layers, "
          f"{sum(p.numel() for p in plain.parameters()) / 1e6:.1f}M params; micro-batch {B} x {T}; {recipe}; "
          f"activation checkpointing {args.ac}; compile {'on' + note if t.compile else 'off'}; AdamW {kernel}; "
          f"ZeRO {args.zero}; self-clip hook {'on' if trainer.self_clip else 'off (DeepSpeed clips)'}")
    print(f"{steps} optimizer steps per timed block, {args.repeats} alternating blocks per side, median; "
          f"{args.warmup} warm-up steps per side and R")
    rows = []
    for R in loops:
        ds_block(R, args.warmup)
        plain_block(R, args.warmup)
        plain_r, ds_r, plain_mem, ds_mem = [], [], [], []
        for _ in range(args.repeats):
            tp, mp, lp = timed(plain_block, R)
            td, md, ld = timed(ds_block, R)
            plain_r.append(tp)
            ds_r.append(td)
            plain_mem.append(mp)
            ds_mem.append(md)
        rows.append((R, statistics.median(plain_r), statistics.median(ds_r), plain_r, ds_r,
                     max(plain_mem) if plain_mem[0] is not None else None,
                     max(ds_mem) if ds_mem[0] is not None else None, float(lp), float(ld)))

    def mem(v):
        return f"{v / 2**30:9.2f}" if v is not None else f"{'-':>9s}"

    print()
    print(f"| {'R':>2s} | {'plain tok/s':>12s} | {'DeepSpeed tok/s':>15s} | {'DS / plain':>10s} | "
          f"{'plain GiB':>9s} | {'DS GiB':>9s} | {'loss plain':>10s} | {'loss DS':>8s} |")
    print(f"|{'-' * 4}|{'-' * 14}|{'-' * 17}|{'-' * 12}|{'-' * 11}|{'-' * 11}|{'-' * 12}|{'-' * 10}|")
    for R, mp, md, _, _, pm, dm, lp, ld in rows:
        print(f"| {R:2d} | {mp:12,.0f} | {md:15,.0f} | {md / mp:10.3f} | {mem(pm)} | {mem(dm)} | {lp:10.4f} | "
              f"{ld:8.4f} |")
    print()
    for R, mp, md, plain_r, ds_r, *_ in rows:
        print(f"R={R} runs: plain {', '.join(f'{v:,.0f}' for v in plain_r)}; DeepSpeed "
              f"{', '.join(f'{v:,.0f}' for v in ds_r)}")
    r1 = [r for r in rows if r[0] == 1]
    if r1:
        ratio = r1[0][2] / r1[0][1]
        print(f"target: DeepSpeed >= 0.95 x plain at R = 1: {ratio:.3f} ({'met' if ratio >= 0.95 else 'NOT met'})")
    print("(memory: peak allocated during the side's timed blocks, with both models and their optimizer "
          "states resident)" if not on_cpu else "(no memory column on cpu)")
    tmp.cleanup()
    return rows


if __name__ == "__main__":
    main()
