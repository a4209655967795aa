"""Claim 2 ("Stability and Generalization in Looped Transformers", the fixed-point paper): a looped model with
input recall and outer normalisation reaches a stable, input-dependent fixed point: trained on prefix parity
at length n it solves n once it runs enough loops, stays solved at many more loops than it was trained with,
and at 2n gets better with more loops; without recall its fixed point ignores the input (chance); with recall
but inner normalisation the state never settles (its norm keeps growing).

Protocol (the paper's single-layer looped model with the deep-thinking recipe, shared/reference_recipes.md):
one bidirectional looped layer (`model.causal: false`, `n_loop: 1`), the flt_reference recipe, d 64, trained
on parity at n = 8 with R ~ Poisson(12) clipped to [4, 24] and gradients through the last 8 loops
(`loop.backprop_loops`: random depth + truncated backprop, so the model cannot learn a solution tied to one
R), lr 2e-3, batch 32, 700 steps (about a minute each on a CPU core). Variants: recall + outer norm, recall +
inner norm, internal recall (outer norm; reported, not judged) and no recall. Evaluated on 512 held-out
examples at n and 2n with R from 1 and n/2 up to 6n loops: sequence and per-position exact match, and at the
last loop the relative step ||h(R) - h(R-1)|| / ||h(R)|| and the state norm (the fixed point's stability).

The verdict holds only if, for every seed (`--seeds 1234,1235`): recall + outer norm solves n (sequence
accuracy >= 0.99 at some R <= 2n) and still does at 6n loops with a relative step under 1e-3
(a fixed point); at 2n its per-position accuracy at R >= n is at least 0.05 above R = n/2; no recall stays
at chance at n (sequence accuracy <= 0.05 at every R); recall + inner norm has no fixed point (state norm
at 6n over at n above 2).

`--scale gpu` (not run on this machine; sized for about 15 minutes a seed on one H100): the paper's prefix
sums at 32 bits with 16..64 training loops (Poisson(32), backprop through 16), d 128, batch 128, 3000 steps,
evaluated at 32, 64 and 128 bits with up to 192 loops. Expected: the same four effects, with extrapolation
to 2n and 4n improving with loops as in the paper's 32 -> 128-bit figures.
"""
from __future__ import annotations

from megaloop.reproduce.runner import ClaimResult, Context, Variant, base_config, fmt, load_trained, train_variants

NAME = "recall_norm"
SUMMARY = ("prefix parity, one bidirectional looped layer trained at n=8 with random loops and truncated backprop, "
           "evaluated at n and 2n with n/2..6n loops: recall+outer norm vs recall+inner norm vs internal recall vs "
           "no recall (accuracy and fixed-point stability)")
EVAL_SEED = 99_991  # held-out examples: the trainer draws from train.seed (training) and train.seed + 1
SOLVED = 0.99  # sequence accuracy that counts as solving a length
CHANCE = 0.05  # sequence accuracy at or under this: chance (2^-n at n = 8 is 0.004)
MARGIN = 0.05  # per-position accuracy gain at 2n from R = n/2 to the best R >= n
FIXED_POINT = 1e-3  # relative step ||h(R) - h(R-1)|| / ||h(R)|| at 6n loops under this: a fixed point
GROWTH = 2.0  # state norm at 6n over at n above this: no fixed point (recall + inner norm)

VARIANTS = {
    "recall_outer": {"injection": "add", "normalization": "outer"},
    "recall_inner": {"injection": "add", "normalization": "inner"},
    "internal_recall": {"injection": "add", "normalization": "outer", "recall": "internal",
                        "internal_recall_site": "pre_mlp", "internal_recall_layers": "first"},
    "no_recall": {"injection": "none", "normalization": "outer"},
}


def settings(ctx: Context) -> dict:
    if ctx.quick:
        s = {"n": 4, "R": 4, "R_min": 2, "R_max": 6, "backprop": 3, "d_model": 32, "n_heads": 2, "steps": 12,
             "batch": 16, "lr": 2e-3, "eval_num": 64, "eval_batch": 64}
    elif ctx.scale == "gpu":
        s = {"n": 32, "R": 32, "R_min": 16, "R_max": 64, "backprop": 16, "d_model": 128, "n_heads": 4,
             "steps": 3000, "batch": 128, "lr": 1e-3, "eval_num": 1024, "eval_batch": 256}
    else:
        s = {"n": 8, "R": 12, "R_min": 4, "R_max": 24, "backprop": 8, "d_model": 64, "n_heads": 4, "steps": 700,
             "batch": 32, "lr": 2e-3, "eval_num": 512, "eval_batch": 128}
    n = s["n"]
    s["lengths"] = [n, 2 * n, 4 * n] if ctx.scale == "gpu" and not ctx.quick else [n, 2 * n]
    s["loops"] = sorted({1, n // 2, n, 3 * n // 2, 2 * n, 3 * n, 4 * n, 6 * n})
    return s


def recall_config(s: dict, extra: dict, model: dict = None, loop: dict = None) -> dict:
    """The recall_norm training config of one variant (`extra`: its model.* keys; train.seed is set per seed by
    train_variants); test_time_compute trains the same recall + outer norm model."""
    n = s["n"]
    return base_config(
        model={"recipe": "flt_reference", "vocab_size": 4, "d_model": s["d_model"], "n_heads": s["n_heads"],
               "n_loop": 1, "loops": s["R"], "max_seq_len": max(s["lengths"]) + 1, "arch": "recurrent",
               "causal": False, **extra, **(model or {})},
        loop={"sampling": "poisson", "mean": s["R"], "min": s["R_min"], "max": s["R_max"],
              "backprop_loops": s["backprop"], **(loop or {})},
        data={"task": "parity", "task_params": {"length": n}, "seq_len": n + 1},
        train={"steps": s["steps"], "micro_batch_size": s["batch"], "lr": s["lr"],
               "min_lr": s["lr"] / 10, "warmup_steps": min(20, s["steps"] // 4),
               "log_interval": max(1, s["steps"] // 20)})


def evaluate(model, task, loops: int, num: int, batch: int) -> dict:
    """Sequence / per-position exact match of `model` at `loops` on `num` held-out examples of `task`, and at
    the last loop the relative step ||h(R) - h(R-1)|| / ||h(R)|| and the state norm (means over tokens)."""
    import torch

    from megaloop.tasks import exact_match_counts

    device = next(model.parameters()).device
    counts, rel, norm, batches = [0, 0, 0, 0], 0.0, 0.0, 0
    with torch.no_grad():
        for start in range(0, num, batch):
            pairs = [task.example(i) for i in range(start, min(num, start + batch))]
            tokens = torch.stack([p[0] for p in pairs]).to(device)
            labels = torch.stack([p[1] for p in pairs])
            out = model(tokens, loops=loops, return_diagnostics=True)
            counts = [a + b for a, b in zip(counts, exact_match_counts(out.logits.cpu(), labels))]
            rel += float(out.diagnostics["relative_residual"][-1])
            norm += float(out.diagnostics["state_norm"][-1])
            batches += 1
    return {"accuracy_sequence": counts[0] / counts[1], "accuracy_position": counts[2] / counts[3],
            "relative_step_last": rel / batches, "state_norm_last": norm / batches}


def load_for_eval(run):
    """The trained model of a run, on the accelerator when there is one (--scale gpu)."""
    model = load_trained(run)
    if model is not None:
        from deepspeed.accelerator import get_accelerator

        model = model.to(get_accelerator().current_device_name())
    return model


def run(ctx: Context) -> ClaimResult:
    """One seed (ctx.seed): train the variants, evaluate them, judge."""
    from megaloop.tasks import build_task

    s = settings(ctx)
    n, loops, lengths = s["n"], s["loops"], s["lengths"]
    names = [v for v in VARIANTS if not (ctx.quick and v == "internal_recall")]  # --quick: the judged three
    runs = train_variants(ctx, ctx.claim_dir(NAME), [Variant(name, recall_config(s, VARIANTS[name]))
                                                      for name in names])
    rows, m = [], {}  # m[variant, length, loops] = evaluate(...)
    for name in names:
        r = runs[name]
        model = load_for_eval(r)
        for length in lengths:
            task = build_task("parity", length=length, seed=EVAL_SEED)
            for k in loops:
                got = evaluate(model, task, k, s["eval_num"], s["eval_batch"])
                m[name, length, k] = got
                rows.append({"variant": name, "train_length": n, "eval_length": length, "eval_loops": k, **got,
                             "final_train_loss": r.final_loss(), "diverged": int(r.diverged)})
    held, verdict, head = _verdict(s, m)

    def draw(fig):
        axes = fig.subplots(1, len(lengths) + 1)
        for ax, length in zip(axes, lengths):
            for name in names:
                ax.plot(loops, [m[name, length, k]["accuracy_sequence"] for k in loops], "o-", ms=3, label=name)
            ax.axvline(s["R"], color="gray", ls="--", lw=1)
            ax.set_xscale("log", base=2)
            ax.set_title(f"length {length}" + (" (train)" if length == n else ""), fontsize=9)
            ax.set_xlabel("test-time loops")
        axes[0].set_ylabel("sequence accuracy")
        axes[0].legend(fontsize=7)
        ax = axes[-1]
        for name in names:
            ax.plot(loops, [max(m[name, n, k]["relative_step_last"], 1e-9) for k in loops], "o-", ms=3, label=name)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(f"||h(R)-h(R-1)|| / ||h(R)|| at length {n}", fontsize=9)
        ax.set_xlabel("test-time loops")
    return ClaimResult(rows, verdict, held, draw, figsize=(4 * (len(lengths) + 1), 3.6), headline=head)


def _verdict(s: dict, m: dict) -> tuple:
    n, loops = s["n"], s["loops"]
    last, half, two = max(loops), n // 2, 2 * n

    def seq(name, length, k):
        return m[name, length, k]["accuracy_sequence"]

    def pos(name, length, k):
        return m[name, length, k]["accuracy_position"]
    solved_at = [k for k in loops if k <= two and seq("recall_outer", n, k) >= SOLVED]
    f = {"outer_best_n": max(seq("recall_outer", n, k) for k in loops if k <= two),
         "outer_first_solved": float(min(solved_at)) if solved_at else float("nan"),
         "outer_last_n": seq("recall_outer", n, last),
         "outer_step_last": m["recall_outer", n, last]["relative_step_last"],
         "outer_2n_half": pos("recall_outer", two, half),
         "outer_2n_best": max(pos("recall_outer", two, k) for k in loops if k >= n),
         "outer_2n_seq_best": max(seq("recall_outer", two, k) for k in loops),
         "no_recall_best_n": max(seq("no_recall", n, k) for k in loops),
         "no_recall_pos_best_n": max(pos("no_recall", n, k) for k in loops),
         "inner_growth": m["recall_inner", n, last]["state_norm_last"] / m["recall_inner", n, n]["state_norm_last"],
         "inner_step_last": m["recall_inner", n, last]["relative_step_last"],
         "inner_last_n": seq("recall_inner", n, last),
         "internal_best_n": max((seq("internal_recall", n, k) for k in loops if ("internal_recall", n, k) in m),
                                default=float("nan")),
         "internal_last_n": seq("internal_recall", n, last) if ("internal_recall", n, last) in m else float("nan")}
    checks = {"recall+outer solves n": f["outer_best_n"] >= SOLVED,
              "stable at 6n": f["outer_last_n"] >= SOLVED and f["outer_step_last"] < FIXED_POINT,
              "2n improves with loops": f["outer_2n_best"] >= f["outer_2n_half"] + MARGIN,
              "no recall at chance": f["no_recall_best_n"] <= CHANCE,
              "inner norm: no fixed point": f["inner_growth"] > GROWTH}
    held = all(checks.values())
    failed = [k for k, ok in checks.items() if not ok]
    sp = {k: fmt(v) for k, v in f.items()}
    verdict = (
        f"{NAME}: {'HELD' if held else 'DID NOT HOLD'} at this scale (parity, one bidirectional looped layer, "
        f"trained n={n} R~Poisson({s['R']}) in [{s['R_min']}, {s['R_max']}] backprop {s['backprop']} loops, "
        f"{s['steps']} steps, {s['eval_num']} examples; "
        f"{'every check met' if held else 'not met: ' + ', '.join(failed)}): recall+outer norm at n: best sequence "
        f"accuracy by R=2n {sp['outer_best_n']} (solved: >= {SOLVED}; "
        f"first at R={sp['outer_first_solved']}), at R={last} {sp['outer_last_n']} with relative step "
        f"{sp['outer_step_last']} (fixed point: under {FIXED_POINT:g}); at 2n per-position accuracy "
        f"{sp['outer_2n_half']} at R={half}, best at R>={n} {sp['outer_2n_best']} (needs +{MARGIN}; best sequence "
        f"accuracy {sp['outer_2n_seq_best']}); no recall: best sequence accuracy at n {sp['no_recall_best_n']} "
        f"(chance: <= {CHANCE}), per-position {sp['no_recall_pos_best_n']}; recall+inner norm: state norm "
        f"x{sp['inner_growth']} from R={n} to {last} (no fixed point: > {GROWTH:g}), relative step "
        f"{sp['inner_step_last']}, sequence accuracy at R={last} {sp['inner_last_n']}; internal recall (not "
        f"judged): best {sp['internal_best_n']}, at R={last} {sp['internal_last_n']}")
    head = {f"outer seq acc n R={last}": f["outer_last_n"], f"outer step R={last}": f["outer_step_last"],
            f"outer pos acc 2n R={half}": f["outer_2n_half"],
            f"outer pos acc 2n best R>={n}": f["outer_2n_best"], "no recall best seq acc n": f["no_recall_best_n"],
            f"inner state norm R={last}/R={n}": f["inner_growth"]}
    return held, verdict, head
