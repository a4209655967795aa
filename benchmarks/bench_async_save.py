"""The step-time hiccup of a checkpoint save, synchronous vs `train.async_save`, one rank.

Both sides are a full `Trainer.run()` of the same config (a synthetic token dataset, log_interval 1 so
the trainer settles and polls every step), saving every --save-interval steps into a fresh folder. The
time from the start of one optimizer step to the start of the next is recorded by wrapping
`Trainer.train_step`; a save sits in the interval after its step. Printed per side: the median step
interval without a save, the median interval holding a save, their difference (the hiccup), and for
async the steps each write took to become complete (`latest` moved).

What async leaves on the step: DeepSpeed building the state dicts and one device -> host copy of every
tensor (a memcpy on CPU; over PCIe on a GPU); the torch.save writes run in a thread. On a CPU machine
that thread competes with training for the cores (and for the GIL while pickling), so the steps after
a save slow down somewhat; on a GPU the write overlaps device work.

    DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 python benchmarks/bench_async_save.py          # d 512, 4 layers, ~29M params
    python benchmarks/bench_async_save.py --d-model 1024 --layers 8 --vocab 32000        # on a GPU

Measured (2026-12-07, the shared 2-core CPU machine, loaded by other jobs; DS_ACCELERATOR=cpu,
OMP_NUM_THREADS=1, defaults: 29.4M parameters, fp32 + AdamW, ZeRO 0, ~350 MB per checkpoint):
    side     step s  save step s  hiccup s  next step s  write complete after
    sync      3.602        6.588     2.986        3.813  -
    async     3.601        4.733     1.133        5.358  step 6: +1, step 12: +1, step 18: +1
(checkpoint 335 MiB; 3 min 56 s for both sides.) The save step's hiccup drops from 3.0 s to 1.1 s (the
state dicts and the host copies), but on this CPU box the writer thread then takes ~1.75 s from the next
step: per save, about the same total cost. The overlap pays where training runs on a device (the host's
cores and the file system do the writing); no GPU figure yet.
"""
import argparse
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--d-model", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4, help="model.n_loop (the looped block's layers)")
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--save-interval", type=int, default=6)
    ap.add_argument("--output", default=None, help="folder for the checkpoints (default: a temporary one)")
    ap.add_argument("overrides", nargs="*", help="section.key=value config overrides")
    return ap.parse_args(argv)


def run_side(args, tmp: str, async_save: bool) -> dict:
    from megaloop.config import load_config
    from megaloop.training.trainer import Trainer
    name = "async" if async_save else "sync"
    cfg = load_config(None, [
        "model.arch=recurrent", f"model.d_model={args.d_model}", "model.n_heads=8", "model.n_kv_heads=8",
        f"model.n_loop={args.layers}", f"model.vocab_size={args.vocab}", f"model.max_seq_len={args.seq}",
        "model.loops=2", f"data.seq_len={args.seq}", f"train.micro_batch_size={args.batch}",
        f"train.steps={args.steps}", f"train.save_interval={args.save_interval}", "train.log_interval=1",
        "train.eval_interval=0", "train.tensorboard=false", f"train.async_save={async_save}",
        f"train.output_dir={tmp}/{name}", "data.tokenizer_type=byte", "data.tokenizer_model=null",
        f"data.data_path=[{tmp}/synthetic]", "data.split=1000,0,0", f"data.cache_dir={tmp}/cache",
        "loop.sampling=fixed", "loop.mean=2"] + list(args.overrides))
    trainer = Trainer(cfg)
    starts = []
    step_fn = trainer.train_step

    def timed(*a, **k):
        starts.append(time.perf_counter())
        return step_fn(*a, **k)
    trainer.train_step = timed
    trainer.run()
    intervals = [b - a for a, b in zip(starts, starts[1:])]  # interval i: after step i + 1 (1-based)
    saves = [i for i in range(len(intervals)) if (i + 1) % args.save_interval == 0]
    plain = [x for i, x in enumerate(intervals) if i not in saves and i - 1 not in saves]
    return {"name": name, "step": statistics.median(plain), "save": statistics.median(intervals[i] for i in saves),
            "after": statistics.median(intervals[i + 1] for i in saves if i + 1 < len(intervals)),
            "history": trainer.saver.history}


def main(argv=None):
    args = parse_args(argv)
    from benchmarks.bench_train_overhead import write_synthetic_dataset
    import torch
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    tmp_obj = None
    tmp = args.output
    if tmp is None:
        tmp_obj = tempfile.TemporaryDirectory(prefix="bench_async_save_")
        tmp = tmp_obj.name
    write_synthetic_dataset(f"{tmp}/synthetic", min(args.vocab, 258), args.seq, n_docs=64)
    rows = [run_side(args, tmp, False), run_side(args, tmp, True)]
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(f"{tmp}/sync/checkpoints/step_"
                                                                           f"{args.save_interval:08d}") for f in fs)
    print(f"checkpoint {size / 2**20:.0f} MiB; save every {args.save_interval} steps, {args.steps} steps")
    print(f"{'side':6} {'step s':>8} {'save step s':>12} {'hiccup s':>9} {'next step s':>12}  write complete after")
    for r in rows:
        lag = ", ".join(f"step {h['step']}: +{h['complete_at'] - h['step']}" for h in r["history"]
                        if h["complete_at"] is not None and h["step"] < args.steps) or "-"
        print(f"{r['name']:6} {r['step']:8.3f} {r['save']:12.3f} {r['save'] - r['step']:9.3f} "
              f"{r['after']:12.3f}  {lag}")


if __name__ == "__main__":
    main()
