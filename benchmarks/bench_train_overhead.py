"""Tokens/s of the DeepSpeed training path against a plain PyTorch loop of the same model, one rank.

Both loops do the same work per step: forward + backward of the LoopedLM at R loops, gradient clipping
at 1.0, an AdamW step, an LR-schedule step. The DeepSpeed side is what pretrain_looped.py runs for PP
= 1 (deepspeed.initialize with the ds_config built from the YAML config, torch AdamW handed over as an
object). Repeats alternate between the two to share the machine's noise; the median is reported.

    DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 python benchmarks/bench_train_overhead.py [--zero 0] [--steps 20]
"""
import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--loops", type=int, default=4)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--zero", type=int, default=0)
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import deepspeed
    from megaloop.config import load_config
    from megaloop.model import build_model
    from megaloop.training.distributed import init_distributed
    from megaloop.training.ds_config import build_ds_config
    from megaloop.training.optim import build_optimizer, build_scheduler

    init_distributed(120)
    cfg = load_config(None, [f"model.d_model={args.d}", "model.n_heads=4", f"model.max_seq_len={args.seq}",
                             f"data.seq_len={args.seq}", "model.n_loop=2", "model.arch=flt", "model.vocab_size=258",
                             f"train.micro_batch_size={args.batch}", f"parallel.zero_stage={args.zero}",
                             f"train.steps={10 ** 6}"])
    torch.manual_seed(0)
    plain_model = build_model(cfg)
    plain_opt = build_optimizer(plain_model, cfg.train)
    plain_sched = build_scheduler(plain_opt, cfg.train)
    torch.manual_seed(0)
    ds_model = build_model(cfg)
    opt = build_optimizer(ds_model, cfg.train)
    sched = build_scheduler(opt, cfg.train)
    # (DeepSpeed clips inside engine.step(); for fp32 ZeRO 0 the trainer clips in an optimizer
    # pre-step hook instead to record the norm - same work.)
    engine, _, _, _ = deepspeed.initialize(model=ds_model, optimizer=opt, lr_scheduler=sched,
                                           config=build_ds_config(cfg, 1))
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, 258, (args.batch, args.seq), generator=gen) for _ in range(args.steps)]
    tokens_per_run = args.steps * args.batch * args.seq

    def run_plain():
        t0 = time.perf_counter()
        for x in batches:
            out = plain_model(x, labels=x, loops=args.loops)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(plain_model.parameters(), 1.0)
            plain_opt.step()
            plain_sched.step()
            plain_opt.zero_grad(set_to_none=True)
        return tokens_per_run / (time.perf_counter() - t0)

    def run_ds():
        t0 = time.perf_counter()
        for x in batches:
            out = engine(x, labels=x, loops=args.loops)
            engine.backward(out.loss)
            engine.step()
        return tokens_per_run / (time.perf_counter() - t0)

    run_plain(), run_ds()  # warm-up
    plain, ds = [], []
    for _ in range(args.repeats):
        plain.append(run_plain())
        ds.append(run_ds())
    mp, md = statistics.median(plain), statistics.median(ds)
    print(f"one rank, {args.threads} thread(s), d={args.d} seq={args.seq} batch={args.batch} R={args.loops} "
          f"ZeRO {args.zero}, fp32, {args.steps} steps x {args.repeats} repeats")
    print(f"plain PyTorch : {mp:10,.0f} tokens/s  (runs: {', '.join(f'{v:,.0f}' for v in plain)})")
    print(f"DeepSpeed     : {md:10,.0f} tokens/s  (runs: {', '.join(f'{v:,.0f}' for v in ds)})")
    print(f"DeepSpeed / plain = {md / mp:.3f}  (overhead {100 * (1 - md / mp):+.1f}%)")


if __name__ == "__main__":
    main()
