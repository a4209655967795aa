"""Claim 5 (Huginn / Ouro / Parcae): more test-time loops lower the perplexity until the gains saturate, and an
adaptive exit (Huginn's KL convergence exit, Ouro's learned exit gate "Q-exit") reaches the plateau with
fewer loops on average than a fixed loop count needs.

Variants on the demo corpus, both FLTs trained with R ~ max(1, Poisson(3)) clipped to 6 (as
yaml_configs/demo_cpu.yaml): without an exit gate (last-loop loss), and with Ouro's exit gate and
exit-weighted loss. Measured with tools/eval_loops.py (validation perplexity at 1..4x the mean training R,
and each exit at the largest loop count with the average loops it used).
"""
from __future__ import annotations

import csv
import os
import subprocess

from megaloop.reproduce.runner import (REPO, ClaimResult, Context, Variant, base_config, demo_corpus, fmt,
                                       train_variants)

NAME = "test_time_compute"
SUMMARY = ("validation perplexity vs test-time loops on the demo corpus, fixed loops vs the KL exit and the "
           "Ouro exit gate")
SATURATE = 0.1  # gains saturate: the gain from R to 4R is under this fraction of the gain from 1 to R
PLATEAU = 0.02  # within 2% of the best fixed-loop perplexity counts as on the plateau
EXITS = {"no_gate": ["kl:1e-2", "kl:1e-3"], "exit_gate": ["kl:1e-2", "kl:1e-3", "q_exit:0.5", "q_exit:0.8"]}


def settings(ctx: Context) -> dict:
    if ctx.quick:
        return {"R": 2, "d_model": 32, "n_heads": 2, "seq": 32, "steps": 10, "batch": 4, "windows": 8}
    return {"R": 3, "d_model": 64, "n_heads": 4, "seq": 64, "steps": 800, "batch": 8, "windows": 128}


def _eval_loops(ctx: Context, run_dir: str, data: dict, loops: str, exits, windows: int, out_dir: str) -> list:
    cmd = [ctx.python, os.path.join(REPO, "tools", "eval_loops.py"), "--model", run_dir, "--data",
           data["data_path"][0], "--split", data["split"], "--loops", loops, "--max-windows", str(windows),
           "--out-dir", out_dir, "--exits", *exits]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"})
    if out.returncode != 0:
        raise RuntimeError(f"eval_loops.py failed on {run_dir}: {(out.stdout + out.stderr)[-1500:]}")
    with open(os.path.join(out_dir, "eval_loops.csv"), newline="") as f:
        return list(csv.DictReader(f))


def run(ctx: Context) -> ClaimResult:
    s = settings(ctx)
    data = demo_corpus(ctx)
    R = s["R"]
    vs = []
    for name, extra in (("no_gate", ({}, {})), ("exit_gate", ({"exit_gate": True}, {"loss": "exit_weighted"}))):
        cfg = base_config(
            model={"vocab_size": data["vocab_size"], "d_model": s["d_model"], "n_heads": s["n_heads"],
                   "max_seq_len": s["seq"], "n_loop": 2, "loops": R, "arch": "flt", **extra[0]},
            loop={"sampling": "poisson", "mean": R, "min": 1, "max": 2 * R, **extra[1]},
            data={"data_path": data["data_path"], "split": data["split"], "seq_len": s["seq"],
                  "tokenizer_type": data["tokenizer_type"], "tokenizer_model": data["tokenizer_model"]},
            train={"steps": s["steps"], "micro_batch_size": s["batch"], "lr": 3e-3, "min_lr": 3e-4,
                   "warmup_steps": min(20, s["steps"] // 4), "log_interval": max(1, s["steps"] // 20)})
        vs.append(Variant(name, cfg))
    claim_dir = ctx.claim_dir(NAME)
    runs = train_variants(ctx, claim_dir, vs)
    loops = list(range(1, 4 * R + 1))
    rows, fixed, exits = [], {}, {}
    for name, r in runs.items():
        ctx.log(f"tools/eval_loops.py on {name}")
        table = _eval_loops(ctx, r.run_dir, data, f"1-{4 * R}", EXITS[name], s["windows"],
                            os.path.join(claim_dir, "eval", name))
        for t in table:
            row = {"variant": name, "mode": t["mode"], "threshold": t["threshold"], "loops": int(t["loops"]),
                   "avg_loops": float(t["avg_loops"]), "ppl": float(t["ppl"]), "final_train_loss": r.final_loss()}
            rows.append(row)
            if t["mode"] == "fixed":
                fixed[name, row["loops"]] = row["ppl"]
            else:
                exits[name, f"{t['mode']}:{t['threshold']}"] = row
    parts, saturates, exit_ok = [], {}, []
    for name in runs:
        ppl = {k: fixed[name, k] for k in loops}
        best = min(ppl.values())
        early, late = ppl[1] - ppl[R], ppl[R] - min(ppl[k] for k in loops if k >= R)
        saturates[name] = early > 0 and late < SATURATE * early
        to_plateau = min(k for k in loops if ppl[k] <= best * (1 + PLATEAU))
        ex = []
        for key, row in exits.items():
            if key[0] != name:
                continue
            ok = row["ppl"] <= best * (1 + PLATEAU) and row["avg_loops"] < to_plateau
            exit_ok.append(ok)
            ex.append(f"{key[1]} ppl {fmt(row['ppl'])} at {row['avg_loops']:.2f} avg loops"
                      f"{' (plateau with fewer loops)' if ok else ''}")
        parts.append(f"{name}: ppl {fmt(ppl[1])} at 1 loop, {fmt(ppl[R])} at R={R}, best {fmt(best)}, plateau "
                     f"(within {PLATEAU:.0%}) from {to_plateau} loops, gain R->{4 * R} {late:.3g} vs 1->R {early:.3g} "
                     f"({'saturates' if saturates[name] else 'does not saturate'}); " + ", ".join(ex))
    held = all(saturates.values()) and any(exit_ok)
    verdict = (f"test_time_compute: {'HELD' if held else 'DID NOT HOLD'} at this scale ({s['steps']} steps, "
               f"R~Poisson({R})): " + " | ".join(parts))

    def draw(fig):
        axes = fig.subplots(1, len(runs), sharey=True)
        for ax, name in zip(axes, runs):
            ax.plot(loops, [fixed[name, k] for k in loops], "o-", ms=3, label="fixed loops")
            for (n, key), row in exits.items():
                if n == name:
                    ax.plot([row["avg_loops"]], [row["ppl"]], "s", label=f"{key} (avg loops)")
            ax.axvline(R, color="gray", ls="--", lw=1)
            ax.set_xlabel("test-time loops")
            ax.set_title(name, fontsize=9)
            ax.legend(fontsize=7)
        axes[0].set_ylabel("validation perplexity")
    return ClaimResult(rows, verdict, held, draw, figsize=(10, 3.8))
