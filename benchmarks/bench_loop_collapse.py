"""Does each tiny config train at its own R as well as the same model at R = 1? (issue 23)

For every `yaml_configs/tiny/*.yaml` (or those named), under the `megaloop` recipe (the library defaults) and
the `flt_reference` recipe (megaloop/config/recipes.py), a plain torch loop trains the config's model on a fixed
byte-level corpus (this repository's README.md and docs/*.md as of commit CORPUS_COMMIT, read with `git show`:
no download, and the figures do not move when the docs change; `--corpus-commit HEAD` for today's) at the
config's R and at R = 1,
same seed, same batches, and prints the mean training loss over the last 10 steps of each. "collapsed" marks a
looped run whose loss ends more than MARGIN above its R = 1 run. Keep it small: the machine is a laptop-sized
CPU. Tokens per step: batch x seq = 8 x 64.

    python benchmarks/bench_loop_collapse.py --steps 150 lt flt inject_add
    python benchmarks/bench_loop_collapse.py --steps 150 --recipes megaloop lt2_gdn --set loop.loss=last
    python benchmarks/bench_loop_collapse.py --steps 150 --seeds 0,1,2 ouro   # mean over seeds, for a borderline row
    # measured 2026-12-07 on the pinned corpus (2 CPU cores, 150 steps, lr 3e-3, seed 0): lt 3.497 at R = 4 vs
    # 2.743 at R = 1 (the unigram loss), flt 2.739 vs 2.743, lt2_gdn as shipped (LT2's loop) 2.399 vs 2.435,
    # ouro over seeds 0-2 3.055 vs 2.690: the full table is in docs/looped_models.md section 11
"""
from __future__ import annotations

import argparse
import glob
import os
import subprocess
import sys
import time

import torch

from megaloop.config import load_config
from megaloop.model.looped_lm import LoopedLM

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MARGIN = 0.25  # nats: a looped run ending this far above its R = 1 run counts as collapsed
# The corpus is pinned to one commit's docs: until 2026-12-07 it was the working tree's, and rows measured
# before and after a docs edit differed by ~0.1 nats at R = 1 (docs/looped_models.md section 11).
CORPUS_COMMIT = "670148484f77d23ff467ebb56b25f84aa941c389"


def _git(*args: str) -> bytes:
    try:
        return subprocess.run(["git", "-C", ROOT, *args], check=True, capture_output=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        detail = getattr(e, "stderr", b"") or b""
        raise SystemExit(f"bench_loop_collapse: cannot read the corpus with git {' '.join(args)} in {ROOT} "
                         f"({detail.decode(errors='replace').strip() or e}); it needs a git checkout of megaloop "
                         f"that has commit {CORPUS_COMMIT[:12]} (or pass --corpus-commit HEAD)")


def corpus(commit: str = CORPUS_COMMIT) -> torch.Tensor:
    """README.md then docs/*.md (sorted) as of `commit`, as bytes."""
    docs = sorted(p for p in _git("ls-tree", "--name-only", commit, "docs/").decode().split() if p.endswith(".md"))
    data = b"".join(_git("show", f"{commit}:{path}") for path in ["README.md", *docs])
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
    ap.add_argument("--corpus-commit", default=CORPUS_COMMIT,
                    help="the commit whose README.md and docs/*.md are the corpus (default: the pinned one)")
    ap.add_argument("--seeds", default="0", help="comma-separated seeds (init and batches); the losses printed "
                    "are their means, the per-seed gaps follow (default: 0, as section 11's table)")
    args = ap.parse_args(argv)
    try:
        seeds = [int(x) for x in args.seeds.split(",")]
    except ValueError:
        ap.error(f"--seeds must be comma-separated integers, got {args.seeds!r}")
    names = args.configs or sorted(os.path.basename(p)[:-5]
                                   for p in glob.glob(os.path.join(ROOT, "yaml_configs/tiny/*.yaml")))
    data = corpus(args.corpus_commit)
    print(f"corpus: README.md + docs/*.md at {args.corpus_commit[:12]}, {data.numel():,} bytes")
    if args.set:
        print("overrides: " + " ".join(args.set))
    print(f"{'config':18s} {'recipe':15s} {'R':>3s} {'loss@R':>8s} {'loss@1':>8s} {'gap':>6s}  verdict  wall_s")
    for name in names:
        for recipe in args.recipes.split(","):
            cfg = load_config(os.path.join(ROOT, "yaml_configs/tiny", name + ".yaml"),
                              [f"model.recipe={recipe}", *args.set])
            R = cfg.model.loops
            if R <= 1:
                print(f"{name:18s} {recipe:15s} {R:3d}  (trains at R = 1: nothing to compare)", flush=True)
                continue
            t0 = time.time()
            pairs = [tuple(train(cfg, loops, data, args.steps, args.lr, seed=seed) for loops in (R, 1))
                     for seed in seeds]
            at_r, at_1 = (sum(p[i] for p in pairs) / len(pairs) for i in (0, 1))
            gap = at_r - at_1
            verdict = "collapsed" if gap > MARGIN else "ok"
            per_seed = "" if len(seeds) == 1 else "  gaps " + " ".join(f"{a - b:+.2f}" for a, b in pairs)
            print(f"{name:18s} {recipe:15s} {R:3d} {at_r:8.3f} {at_1:8.3f} {gap:+6.2f}  {verdict:9s} "
                  f"{time.time() - t0:5.0f}{per_seed}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
