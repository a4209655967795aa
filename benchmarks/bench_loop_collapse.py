"""Does each tiny config train at its own R as well as the same model at R = 1? (issue 23)

For every `yaml_configs/tiny/*.yaml` (or those named), under the `megaloop` recipe (the library defaults) and
the `flt_reference` recipe (megaloop/config/recipes.py), a plain torch loop trains the config's model on a fixed
byte-level corpus (this repository's docs/*.md and README.md as of the commit run: no download; the figures move
slightly as those files change) at the config's R and at R = 1,
same seed, same batches, and prints the mean training loss over the last 10 steps of each. "collapsed" marks a
looped run whose loss ends more than MARGIN above its R = 1 run. Keep it small: the machine is a laptop-sized
CPU. Tokens per step: batch x seq = 8 x 64.

    python benchmarks/bench_loop_collapse.py --steps 150 lt flt inject_add
    python benchmarks/bench_loop_collapse.py --steps 150 --recipes megaloop lt2_gdn --set loop.loss=last
    # measured (2 shared CPU cores, 150 steps, lr 3e-3, seed 0; lt 3.561 at R = 4 vs 2.739 at R = 1, flt 2.733
    # vs 2.739; lt2_gdn as shipped, loop.loss mean, 2.606 vs 2.549, with loop.loss=last 3.177 vs 2.591): the
    # full table is in docs/looped_models.md section 11
"""
from __future__ import annotations

import argparse
import glob
import os
import sys
import time

import torch

from megaloop.config import load_config
from megaloop.model.looped_lm import LoopedLM

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MARGIN = 0.25  # nats: a looped run ending this far above its R = 1 run counts as collapsed


def corpus() -> torch.Tensor:
    files = [os.path.join(ROOT, "README.md")] + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))
    data = b"".join(open(f, "rb").read() for f in files)
    return torch.tensor(list(data), dtype=torch.long)


def train(cfg, loops: int, data: torch.Tensor, steps: int, lr: float, batch: int = 8, seq: int = 64,
          seed: int = 0) -> float:
    """Mean training cross-entropy of the last 10 of `steps` AdamW steps at `loops` iterations (no sampling of
    R; the config's loop.loss)."""
    torch.manual_seed(seed)
    model = LoopedLM(cfg.model, loss=cfg.loop.loss, exit_entropy_weight=cfg.loop.exit_entropy_weight)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    losses = []
    for step in range(steps):
        starts = torch.randint(0, data.numel() - seq - 1, (batch,), generator=g)
        x = torch.stack([data[s:s + seq + 1] for s in starts.tolist()])
        for group in opt.param_groups:  # linear warm-up over 10 steps, then constant
            group["lr"] = lr * min(1.0, (step + 1) / 10)
        out = model(x[:, :-1], labels=x[:, 1:], loops=loops)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        # The figure is the cross-entropy of the logits the model returns (its last loop's), whatever loss
        # the config trains with (Ouro's exit-weighted loss adds an entropy term).
        with torch.no_grad():
            losses.append(float(torch.nn.functional.cross_entropy(out.logits.flatten(0, 1).float(),
                                                                   x[:, 1:].flatten())))
    tail = losses[-10:]
    return sum(tail) / len(tail)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("configs", nargs="*", help="tiny config names (default: all)")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--recipes", default="megaloop,flt_reference")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a config override applied to every config (e.g. loop.loss=mean), repeatable")
    args = ap.parse_args(argv)
    names = args.configs or sorted(os.path.basename(p)[:-5] for p in glob.glob(os.path.join(ROOT, "yaml_configs/tiny/*.yaml")))
    data = corpus()
    if args.set:
        print("overrides: " + " ".join(args.set))
    print(f"{'config':18s} {'recipe':15s} {'R':>3s} {'loss@R':>8s} {'loss@1':>8s} {'gap':>6s}  verdict  wall_s")
    for name in names:
        for recipe in args.recipes.split(","):
            cfg = load_config(os.path.join(ROOT, "yaml_configs/tiny", name + ".yaml"),
                              [f"model.recipe={recipe}", *args.set])
            R = cfg.model.loops
            t0 = time.time()
            at_r = train(cfg, R, data, args.steps, args.lr)
            at_1 = train(cfg, 1, data, args.steps, args.lr)
            gap = at_r - at_1
            verdict = "collapsed" if gap > MARGIN else "ok"
            print(f"{name:18s} {recipe:15s} {R:3d} {at_r:8.3f} {at_1:8.3f} {gap:+6.2f}  {verdict:9s} {time.time() - t0:5.0f}",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
