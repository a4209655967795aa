"""Claim 5 (Huginn / Ouro / Parcae): more test-time loops improve the model until the gains saturate, and an
adaptive exit (Huginn's KL convergence exit, Ouro's learned exit gate "Q-exit") reaches the plateau with
fewer loops on average than a fixed loop count needs.

Two models per domain, trained with R ~ max(1, Poisson(R)) clipped to 2R (as yaml_configs/demo_cpu.yaml):
without an exit gate (last-loop loss), and with Ouro's exit gate and exit-weighted loss.
- demo corpus (FLTs): validation perplexity with tools/eval_loops.py at 1..4R loops, each exit at 4R loops
  with the average loops it used;
- prefix parity (recall + outer norm, the recall_norm claim's best variant): per-position exact-match accuracy
  with megaloop.tasks at 1..4R loops, and with LoopedLM.forward's exits (average loops at the answer positions).
"""
from __future__ import annotations

import csv
import os
import subprocess

from megaloop.reproduce.runner import (REPO, ClaimResult, Context, Variant, base_config, demo_corpus, fmt,
                                       load_trained, task_accuracy, task_accuracy_exit, train_variants)

NAME = "test_time_compute"
SUMMARY = ("perplexity (demo corpus) and parity accuracy vs test-time loops, fixed loops vs the KL exit and the "
           "Ouro exit gate")
SATURATE = 0.1  # gains saturate: the gain from R to 4R is under this fraction of the gain from 1 to R
# On the plateau: within this fraction of the looping gain (best - value at 1 loop) of the best fixed-loop value,
# i.e. at least 90% of what more loops can buy is reached.
PLATEAU = 0.1
EXITS = {"no_gate": ["kl:1e-2", "kl:1e-3"], "exit_gate": ["kl:1e-2", "kl:1e-3", "q_exit:0.5", "q_exit:0.8"]}
EVAL_SEED = 99_991
GATE = ({"exit_gate": True}, {"loss": "exit_weighted"})


def settings(ctx: Context) -> dict:
    if ctx.quick:
        return {"R": 2, "d_model": 32, "n_heads": 2, "seq": 32, "steps": 10, "batch": 4, "windows": 8,
                "n": 8, "task_steps": 10, "task_batch": 16, "eval_num": 64}
    return {"R": 3, "d_model": 64, "n_heads": 4, "seq": 64, "steps": 800, "batch": 8, "windows": 128,
            "n": 16, "task_steps": 600, "task_batch": 32, "eval_num": 128}


def _variants(s: dict, data: dict) -> list:
    R, out = s["R"], []
    for gate in ("no_gate", "exit_gate"):
        model, loop = GATE if gate == "exit_gate" else ({}, {})
        schedule = {"sampling": "poisson", "mean": R, "min": 1, "max": 2 * R, **loop}
        out.append(Variant(f"demo_{gate}", base_config(
            model={"vocab_size": data["vocab_size"], "d_model": s["d_model"], "n_heads": s["n_heads"],
                   "max_seq_len": s["seq"], "n_loop": 2, "loops": R, "arch": "flt", **model},
            loop=schedule,
            data={"data_path": data["data_path"], "split": data["split"], "seq_len": s["seq"],
                  "tokenizer_type": data["tokenizer_type"], "tokenizer_model": data["tokenizer_model"]},
            train={"steps": s["steps"], "micro_batch_size": s["batch"], "lr": 3e-3, "min_lr": 3e-4,
                   "warmup_steps": min(20, s["steps"] // 4), "log_interval": max(1, s["steps"] // 20)})))
        out.append(Variant(f"parity_{gate}", base_config(
            model={"vocab_size": 4, "d_model": s["d_model"], "n_heads": s["n_heads"], "max_seq_len": s["n"] + 1,
                   "n_loop": 2, "loops": R, "arch": "recurrent", "injection": "add", "normalization": "outer",
                   **model},
            loop=schedule,
            data={"task": "parity", "task_params": {"length": s["n"]}, "seq_len": s["n"] + 1},
            train={"steps": s["task_steps"], "micro_batch_size": s["task_batch"], "lr": 3e-3, "min_lr": 3e-4,
                   "log_interval": max(1, s["task_steps"] // 20)})))
    return out


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


def _measure(ctx, s, data, runs, claim_dir):
    """rows for summary.csv; fixed[(variant, loops)] = value; exits[(variant, 'kl:1e-3')] = row."""
    R = s["R"]
    rows, fixed, exits = [], {}, {}
    for name, r in runs.items():
        gate = name.split("_", 1)[1]
        base = {"variant": name, "data": "demo" if name.startswith("demo") else "parity"}
        if base["data"] == "demo":
            ctx.log(f"tools/eval_loops.py on {name}")
            table = _eval_loops(ctx, r.run_dir, data, f"1-{4 * R}", EXITS[gate], s["windows"],
                                os.path.join(claim_dir, "eval", name))
            measured = [(t["mode"], t["threshold"], int(t["loops"]), float(t["avg_loops"]), float(t["ppl"]),
                         float("nan")) for t in table]
        else:
            from megaloop.tasks import build_task
            model, task = load_trained(r), build_task("parity", length=s["n"], seed=EVAL_SEED)
            measured = [("fixed", "", k, float(k), float("nan"), task_accuracy(model, task, k, num=s["eval_num"])[1])
                        for k in range(1, 4 * R + 1)]
            for item in EXITS[gate]:
                mode, thr = item.split(":")
                acc, used = task_accuracy_exit(model, task, 4 * R, mode, float(thr), num=s["eval_num"])
                measured.append((mode, thr, 4 * R, used, float("nan"), acc))
        for mode, thr, loops, used, ppl, acc in measured:
            row = {**base, "mode": mode, "threshold": thr, "loops": loops, "avg_loops": used, "ppl": ppl,
                   "accuracy_position": acc, "final_train_loss": r.final_loss()}
            rows.append(row)
            value = ppl if base["data"] == "demo" else acc
            if mode == "fixed":
                fixed[name, loops] = value
            else:
                exits[name, f"{mode}:{thr}"] = (used, value)
    return rows, fixed, exits


def run(ctx: Context) -> ClaimResult:
    s = settings(ctx)
    data = demo_corpus(ctx)
    R = s["R"]
    claim_dir = ctx.claim_dir(NAME)
    runs = train_variants(ctx, claim_dir, _variants(s, data))
    rows, fixed, exits = _measure(ctx, s, data, runs, claim_dir)
    loops = list(range(1, 4 * R + 1))
    parts, saturates, exit_ok = [], {}, {"demo": False, "parity": False}
    for name in runs:
        dom = "demo" if name.startswith("demo") else "parity"
        sign = 1.0 if dom == "parity" else -1.0  # "better" = higher accuracy, lower perplexity
        v = {k: sign * fixed[name, k] for k in loops}
        best = max(v.values())
        early, late = v[R] - v[1], max(v[k] for k in loops if k >= R) - v[R]
        saturates[name] = early > 0 and late < SATURATE * early
        tol = PLATEAU * (best - v[1])
        to_plateau = min(k for k in loops if v[k] >= best - tol)
        ex = []
        for (n, key), (used, value) in exits.items():
            if n != name:
                continue
            ok = sign * value >= best - tol and used < to_plateau
            exit_ok[dom] = exit_ok[dom] or ok
            ex.append(f"{key} {fmt(value)} at {used:.2f} avg loops{' (plateau, fewer loops)' if ok else ''}")
        what = "acc" if dom == "parity" else "ppl"
        trend = "saturates" if saturates[name] else "does not saturate"
        parts.append(f"{name}: {what} {fmt(fixed[name, 1])} at 1 loop, {fmt(fixed[name, R])} at R={R}, best "
                     f"{fmt(sign * best)}, plateau from {to_plateau} loops, best change 1->R "
                     f"{sign * early + 0.0:+.3g} vs R->{4 * R} {sign * late + 0.0:+.3g} ({trend}); " + ", ".join(ex))
    held = all(saturates.values()) and all(exit_ok.values())
    verdict = (f"test_time_compute: {'HELD' if held else 'DID NOT HOLD'} at this scale (R~Poisson({R}); demo "
               f"{s['steps']} steps, parity n={s['n']} {s['task_steps']} steps; saturation: gain R->4R under "
               f"{SATURATE:.0%} of 1->R; plateau: within {PLATEAU:.0%} of the looping gain of the best): "
               + " | ".join(parts))

    def draw(fig):
        axes = fig.subplots(1, len(runs))
        for ax, name in zip(axes, runs):
            ax.plot(loops, [fixed[name, k] for k in loops], "o-", ms=3, label="fixed loops")
            for (n, key), (used, value) in exits.items():
                if n == name:
                    ax.plot([used], [value], "s", label=f"{key} (avg loops)")
            ax.axvline(R, color="gray", ls="--", lw=1)
            ax.set_xlabel("test-time loops")
            ax.set_ylabel("validation perplexity" if name.startswith("demo") else "per-position accuracy")
            ax.set_title(name, fontsize=9)
            ax.legend(fontsize=6)
    return ClaimResult(rows, verdict, held, draw, figsize=(15, 3.8))
