"""How fast does each lt2_mixers variant learn MQAR on this machine? (issue 23: a CPU-learnable MQAR size)

Trains one variant of the lt2_mixers claim (megaloop/reproduce/lt2_mixers.py: its block, recipe, loop and
parameter matching) on one MQAR size in a plain in-process loop (megaloop's optimizer and LR schedule, gradient
clip, no DeepSpeed), and prints the per-position accuracy on 256 held-out examples every --eval-every steps with
the wall time. Exploratory: pick a size here with a seed that is not a reported one, then run the claim.

    python benchmarks/bench_mqar_learning.py --variant gdn_looped --pairs 4 --keys 16 --values 16 --d-model 32 \\
        --heads 8 --steps 3000 --lr 3e-3
    # measured 2026-12-07 with this script's first form (batches drawn from the global RNG; seed 7, batch 32,
    # 2 shared CPU cores), accuracy at steps 500 / 1500 / 3000: gdn_unlooped 0.322 / 0.717 / 0.857
    # (0.14 s/step), gdn_looped 0.207 / 0.523 / 0.560 (0.45 s/step). Looping slowed GDN's learning at every
    # size tried (megaloop/reproduce/lt2_mixers.py's docstring lists them).
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

from megaloop.model import build_model
from megaloop.reproduce import lt2_mixers
from megaloop.reproduce.runner import resolved_config, task_accuracy
from megaloop.tasks import build_task
from megaloop.training.optim import build_optimizer, lr_at


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variant", default="gdn_looped", choices=sorted(lt2_mixers.MIXERS))
    ap.add_argument("--pairs", type=int, default=4)
    ap.add_argument("--keys", type=int, default=16)
    ap.add_argument("--values", type=int, default=16)
    ap.add_argument("--d-model", type=int, default=32)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--loops", type=int, default=4, help="R of the looped variants")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--eval-every", type=int, default=250)
    args = ap.parse_args(argv)

    torch.manual_seed(args.seed)
    s = {"R": args.loops, "d_model": args.d_model, "n_heads": args.heads, "batch": args.batch, "lr": args.lr,
         "warmup": args.warmup}
    params = {"num_kv_pairs": args.pairs, "num_keys": args.keys, "num_values": args.values}
    task = ("mqar", params, args.steps, 0)
    mixer, looped = lt2_mixers.MIXERS[args.variant]
    target = lt2_mixers.param_count(lt2_mixers._config(s, task, "gdn", args.loops))  # the claim's matching
    ffn = None if mixer == "gdn" else lt2_mixers._matched_ffn(s, task, mixer, args.loops, target)
    loops = args.loops if looped else 1
    cfg = resolved_config(lt2_mixers._config(s, task, mixer, loops, ffn))
    model = build_model(cfg)
    opt = build_optimizer(model, cfg.train)
    train, held_out = build_task("mqar", seed=args.seed, **params), build_task("mqar", seed=99_991, **params)
    print(f"{args.variant}: {model.num_params():,} parameters, R {loops}, MQAR {params}, key width "
          f"{args.d_model // args.heads}, batch {args.batch}, lr {args.lr}, seed {args.seed}")
    print(f"{'step':>6s} {'loss':>7s} {'accuracy':>9s} {'wall_s':>7s}")
    g = torch.Generator().manual_seed(args.seed)
    t0 = time.time()
    for step in range(1, args.steps + 1):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg.train)
        pairs = [train.example(int(i)) for i in torch.randint(0, 2**31 - 1, (args.batch,), generator=g)]
        loss = model(torch.stack([p[0] for p in pairs]), labels=torch.stack([p[1] for p in pairs]), loops=loops).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        opt.step()
        if step % args.eval_every == 0 or step == args.steps:
            model.eval()
            accuracy = task_accuracy(model, held_out, loops, num=256)[1]
            model.train()
            print(f"{step:6d} {loss.item():7.3f} {accuracy:9.3f} {time.time() - t0:7.0f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
