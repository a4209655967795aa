"""Claim 2 ("Stability and Generalization in Looped Transformers", the fixed-point paper): with input recall
and outer normalization a looped model trained on prefix parity at length n with R loops extrapolates to
longer inputs (2n .. 4n) and gets better with more test-time loops; without recall it does not.

Variants, as yaml_configs/tiny/{lt, inject_add_inner, inject_add, inject_internal}.yaml configure them:
no recall (injection none, outer norm), recall + inner norm, recall + outer norm, internal recall (outer
norm). Trained with data.task=parity at length n; evaluated with megaloop.tasks (exact_match_counts) on
held-out examples at lengths n, 2n, 3n, 4n and 1, R/2, R, 2R, 3R, 4R loops (model.max_seq_len covers 4n from the start,
RoPE positions beyond n are never trained).
"""
from __future__ import annotations

from megaloop.reproduce.runner import (ClaimResult, Context, Variant, base_config, fmt, load_trained, task_accuracy,
                                       train_variants)

NAME = "recall_norm"
SUMMARY = ("prefix parity trained at length n with R loops, evaluated at n..4n with 1..4R loops: no recall vs "
           "recall+inner norm vs recall+outer norm vs internal recall")
EVAL_SEED = 99_991  # held-out examples: the trainer draws from train.seed (training) and train.seed + 1
MARGIN = 0.01  # "improves with more loops": the best accuracy beyond R loops is at least this much higher

VARIANTS = {
    "no_recall": {"injection": "none", "normalization": "outer"},
    "recall_inner": {"injection": "add", "normalization": "inner"},
    "recall_outer": {"injection": "add", "normalization": "outer"},
    "internal_recall": {"injection": "add", "normalization": "outer", "recall": "internal",
                        "internal_recall_site": "pre_mlp", "internal_recall_layers": "first"},
}


def settings(ctx: Context) -> dict:
    if ctx.quick:
        return {"n": 8, "R": 2, "d_model": 32, "n_heads": 2, "steps": 15, "batch": 16, "eval_num": 64}
    return {"n": 16, "R": 4, "d_model": 64, "n_heads": 4, "steps": 600, "batch": 32, "eval_num": 128}


def run(ctx: Context) -> ClaimResult:
    from megaloop.tasks import build_task

    s = settings(ctx)
    n, R = s["n"], s["R"]
    vs = []
    for name, extra in VARIANTS.items():
        cfg = base_config(
            model={"vocab_size": 4, "d_model": s["d_model"], "n_heads": s["n_heads"], "n_loop": 2, "loops": R,
                   "max_seq_len": 4 * n + 1, "arch": "recurrent", **extra},
            loop={"mean": R},
            data={"task": "parity", "task_params": {"length": n}, "seq_len": n + 1},
            train={"steps": s["steps"], "micro_batch_size": s["batch"], "lr": 3e-3, "min_lr": 3e-4,
                   "log_interval": max(1, s["steps"] // 20)})
        vs.append(Variant(name, cfg))
    runs = train_variants(ctx, ctx.claim_dir(NAME), vs)
    lengths = [n, 2 * n, 3 * n, 4 * n]
    loops = sorted({1, max(1, R // 2), R, 2 * R, 3 * R, 4 * R})
    rows, acc = [], {}
    for name, r in runs.items():
        model = load_trained(r)
        for length in lengths:
            task = build_task("parity", length=length, seed=EVAL_SEED)
            for k in loops:
                seq, pos = task_accuracy(model, task, k, num=s["eval_num"])
                acc[name, length, k] = pos
                rows.append({"variant": name, "train_length": n, "train_loops": R, "eval_length": length,
                             "eval_loops": k, "accuracy_position": pos, "accuracy_sequence": seq,
                             "final_train_loss": r.final_loss(), "diverged": int(r.diverged)})
    L = 4 * n
    outer_R, outer_4R = acc["recall_outer", L, R], acc["recall_outer", L, 4 * R]
    outer_more = max(acc["recall_outer", L, k] for k in loops if k > R)
    best = {name: max(acc[name, L, k] for k in loops) for name in VARIANTS}
    improves = outer_more >= outer_R + MARGIN
    beats_no_recall = best["recall_outer"] > best["no_recall"]
    no_recall_gain = acc["no_recall", L, 4 * R] - acc["no_recall", L, R]
    held = improves and beats_no_recall
    verdict = (f"recall_norm: {'HELD' if held else 'DID NOT HOLD'} at this scale (parity, trained n={n} R={R}, "
               f"{s['steps']} steps; per-position accuracy at length {L}): recall+outer norm {fmt(outer_R)} at R={R}, "
               f"best beyond R {fmt(outer_more)}, {fmt(outer_4R)} at {4 * R} loops "
               f"({'improves' if improves else 'does not improve'} with loops, margin {MARGIN}), "
               f"best {fmt(best['recall_outer'])} vs no recall best {fmt(best['no_recall'])} "
               f"(no recall R->4R change {no_recall_gain:+.3f}); recall+inner best {fmt(best['recall_inner'])}, "
               f"internal recall best {fmt(best['internal_recall'])}; at the training length n={n}, R={R}: "
               + ", ".join(f"{v} {fmt(acc[v, n, R])}" for v in VARIANTS))

    def draw(fig):
        axes = fig.subplots(1, len(lengths), sharey=True)
        for ax, length in zip(axes, lengths):
            for name in VARIANTS:
                ax.plot(loops, [acc[name, length, k] for k in loops], "o-", ms=3, label=name)
            ax.axvline(R, color="gray", ls="--", lw=1)
            ax.axhline(0.5, color="gray", ls=":", lw=1)
            ax.set_title(f"length {length}" + (" (train)" if length == n else ""), fontsize=9)
            ax.set_xlabel("test-time loops")
        axes[0].set_ylabel("per-position accuracy")
        axes[0].legend(fontsize=7)
    return ClaimResult(rows, verdict, held, draw, figsize=(12, 3.6))
