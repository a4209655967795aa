"""One-command reproductions of the looped-model papers' claims, trained through the real stack.

    python tools/reproduce.py --list
    python tools/reproduce.py flt_stability [--quick] [--seeds 1234,1235] [--out runs/reproduce] [--write-docs]

Each claim (one module here) trains its variants with `pretrain_looped.py` (one rank, a subprocess each;
runner.py), measures them with megaloop's own code, writes OUT/<claim>/{summary.csv, figure.png,
result.json} and prints one verdict line computed from the measurements. docs.py renders
docs/reproductions.md from the result.json files.
"""
from __future__ import annotations

import importlib
import time

CLAIMS = ("flt_stability", "recall_norm", "parcae_injection", "lt2_mixers", "test_time_compute")


def claim_module(name: str):
    if name not in CLAIMS:
        raise ValueError(f"unknown claim {name!r}; known: {', '.join(CLAIMS)} (tools/reproduce.py --list)")
    return importlib.import_module(f"megaloop.reproduce.{name}")


def run_claim(name: str, ctx, command: str) -> dict:
    """Train, measure (once per seed in ctx.seeds), write OUT/<name>/{summary.csv, figure.png, result.json};
    returns the result record. The verdict holds only if it holds for every seed (seeds.combine)."""
    from megaloop.reproduce.runner import write_outputs
    from megaloop.reproduce.seeds import combine

    t0 = time.time()
    per_seed = []
    for seed in ctx.seeds:
        ctx.seed = seed
        per_seed.append(claim_module(name).run(ctx))
    return write_outputs(ctx, name, combine(name, ctx.seeds, per_seed), command, time.time() - t0)
