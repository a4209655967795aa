"""Claim 4 (LT2, linear-time looped transformers): looping helps the linear-time mixer (looped Gated DeltaNet
beats the same GDN block run once), and the GDN + softmax-attention hybrid matches looped softmax attention.

Variants at (nearly) equal parameters, one looped block of 2 layers with LT2's zero-init per-loop residual
gate: looped GDN (R loops), unlooped GDN (the same block, R = 1: identical parameters), looped softmax
attention and the looped 1:1 GDN/attention hybrid (their MLP width set so that the parameter count matches
the GDN block's). Tasks: MQAR (associative recall) and S5 (permutation state tracking). Measured with
megaloop.tasks exact_match_counts on held-out examples at the trained R (and at 1 .. 2R loops for the figure).
"""
from __future__ import annotations

from megaloop.reproduce.runner import (ClaimResult, Context, Variant, base_config, fmt, load_trained, param_count,
                                       task_accuracy, train_variants)

NAME = "lt2_mixers"
SUMMARY = ("looped GDN vs unlooped GDN vs looped softmax attention (and the GDN/attention hybrid) at equal "
           "parameters on MQAR and S5")
EVAL_SEED = 99_991
MATCH = 0.05  # the hybrid "matches" attention when its accuracy is at most this much lower

MIXERS = {"gdn_looped": ("gdn", True), "gdn_unlooped": ("gdn", False), "attn_looped": ("attn", True),
          "hybrid_looped": ("gdn,attn", True)}


def settings(ctx: Context) -> dict:
    if ctx.quick:
        return {"R": 2, "d_model": 32, "n_heads": 2, "steps": 6, "batch": 8, "eval_num": 32,
                "tasks": {"mqar": {"num_kv_pairs": 4, "num_keys": 16, "num_values": 16},
                          "s5": {"length": 8}}}
    # (at 250 steps, 8 pairs over 32 keys / values and S5 at length 12 stayed at chance for every variant)
    return {"R": 4, "d_model": 64, "n_heads": 4, "steps": 400, "batch": 16, "eval_num": 128,
            "tasks": {"mqar": {"num_kv_pairs": 4, "num_keys": 8, "num_values": 8},
                      "s5": {"length": 8}}}


def _config(s: dict, task: str, params: dict, mixer: str, loops: int, ffn=None) -> dict:
    from megaloop.tasks import build_task

    t = build_task(task, **params)
    return base_config(
        model={"vocab_size": t.vocab_size, "d_model": s["d_model"], "n_heads": s["n_heads"], "n_loop": 2,
               "loops": loops, "max_seq_len": t.seq_len, "mixer": mixer, "loop_residual_gate": True,
               "max_loops": 16, "ffn_hidden": ffn},
        loop={"mean": loops, "max": 16},
        data={"task": task, "task_params": dict(params), "seq_len": t.seq_len},
        train={"steps": s["steps"], "micro_batch_size": s["batch"], "lr": 3e-3, "min_lr": 3e-4,
               "log_interval": max(1, s["steps"] // 20)})


def _matched_ffn(s, task, params, mixer, loops, target: int) -> int:
    """The MLP width that brings the `mixer` block's parameter count closest to `target` (it is linear in it)."""
    base = _config(s, task, params, mixer, loops)
    f0 = 64 * -(-8 * s["d_model"] // (3 * 64))  # ModelConfig.ffn_dim's swiglu default
    p0 = param_count(base)
    slope = (param_count(_config(s, task, params, mixer, loops, f0 + 64)) - p0) / 64
    return max(8, f0 + round((target - p0) / slope))


def run(ctx: Context) -> ClaimResult:
    from megaloop.tasks import build_task

    s = settings(ctx)
    R = s["R"]
    vs, params_of = [], {}
    for task, tp in s["tasks"].items():
        target = param_count(_config(s, task, tp, "gdn", R))
        for name, (mixer, looped) in MIXERS.items():
            ffn = None if mixer == "gdn" else _matched_ffn(s, task, tp, mixer, R, target)
            cfg = _config(s, task, tp, mixer, R if looped else 1, ffn)
            params_of[task, name] = param_count(cfg)
            vs.append(Variant(f"{task}_{name}", cfg))
    runs = train_variants(ctx, ctx.claim_dir(NAME), vs)
    rows, acc, curve = [], {}, {}
    curve_loops = sorted({1, max(1, R // 2), R, 3 * R // 2, 2 * R})
    for task, tp in s["tasks"].items():
        t = build_task(task, seed=EVAL_SEED, **tp)
        for name, (mixer, looped) in MIXERS.items():
            r = runs[f"{task}_{name}"]
            model = load_trained(r)
            loops = R if looped else 1
            seq, pos = task_accuracy(model, t, loops, num=s["eval_num"])
            acc[task, name] = pos
            curve[task, name] = [task_accuracy(model, t, k, num=s["eval_num"])[1] for k in curve_loops]
            rows.append({"task": task, "variant": name, "mixer": mixer, "loops": loops,
                         "params": params_of[task, name], "accuracy_position": pos, "accuracy_sequence": seq,
                         "final_train_loss": r.final_loss(), "diverged": int(r.diverged),
                         "train_wall_s": round(r.wall_s, 1)})
    helps = {task: acc[task, "gdn_looped"] > acc[task, "gdn_unlooped"] for task in s["tasks"]}
    matches = {task: acc[task, "hybrid_looped"] >= acc[task, "attn_looped"] - MATCH for task in s["tasks"]}
    held = all(helps.values()) and all(matches.values())
    parts = [f"{task}: GDN looped {fmt(acc[task, 'gdn_looped'])} vs unlooped {fmt(acc[task, 'gdn_unlooped'])} "
             f"({'looping helps' if helps[task] else 'looping does not help'}), hybrid "
             f"{fmt(acc[task, 'hybrid_looped'])} vs attention {fmt(acc[task, 'attn_looped'])} "
             f"({'matches' if matches[task] else 'does not match'}, tolerance {MATCH})" for task in s["tasks"]]
    verdict = (f"lt2_mixers: {'HELD' if held else 'DID NOT HOLD'} at this scale (R={R}, {s['steps']} steps, "
               f"per-position accuracy, ~{params_of['mqar', 'gdn_looped']:,} parameters on MQAR): " + "; ".join(parts))

    def draw(fig):
        axes = fig.subplots(1, 2 * len(s["tasks"]))
        for i, task in enumerate(s["tasks"]):
            ax = axes[2 * i]
            names = list(MIXERS)
            ax.bar(range(len(names)), [acc[task, n] for n in names], color=["C0", "C1", "C2", "C3"])
            ax.set_xticks(range(len(names)))
            ax.set_xticklabels([n.replace("_", "\n") for n in names], fontsize=7)
            ax.set_ylim(0, 1)
            ax.set_title(f"{task}: accuracy at trained loops", fontsize=9)
            ax = axes[2 * i + 1]
            for n in names:
                ax.plot(curve_loops, curve[task, n], "o-", ms=3, label=n)
            ax.axvline(R, color="gray", ls="--", lw=1)
            ax.set_xlabel("test-time loops")
            ax.set_title(f"{task}: accuracy vs loops", fontsize=9)
            ax.set_ylim(0, 1)
        axes[0].set_ylabel("per-position accuracy")
        axes[1].legend(fontsize=6)
    return ClaimResult(rows, verdict, held, draw, figsize=(14, 3.6))
