"""Claim 1 (Fully Looped Transformer paper): at K = 12 loops the baseline LT's residual stream grows with the
loop index k (and its loss is worse, or it diverges), while the FLT's stays bounded.

Variants, one config apart (model.arch; docs/looped_models.md sections 2 and 4): LT (recurrent, no injection,
outer norm), LT_i, LT_ia, FLT; trained on the demo corpus with R = K fixed. Measured from the trainer's
metrics.jsonl: the training loss curve, the validation loss at the end, and the per-loop mean token norm
||x(k)|| of the un-normalized loop output (the paper's residual-explosion probe) at the last logged step and,
for the last loop, over training.
"""
from __future__ import annotations

from megaloop.reproduce.runner import ClaimResult, Context, Variant, base_config, demo_corpus, fmt, train_variants

NAME = "flt_stability"
SUMMARY = "LT vs LT_i vs LT_ia vs FLT at K=12 on the demo corpus: loss curves and per-loop residual norm ||x(k)||"
GROWTH = 1.5  # ||x(K)|| / ||x(1)|| at or above this counts as "grows with k"; below it as "bounded"

ARCHS = {"LT": {"arch": "recurrent", "injection": "none", "normalization": "outer"},
         "LT_i": {"arch": "lt_i"}, "LT_ia": {"arch": "lt_ia"}, "FLT": {"arch": "flt"}}


def variants(ctx: Context):
    data = demo_corpus(ctx)
    K = 12
    if ctx.quick:
        size = {"d_model": 32, "n_heads": 2, "n_loop": 1, "max_seq_len": 32}
        train = {"steps": 12, "micro_batch_size": 4, "log_interval": 4, "eval_interval": 12, "eval_iters": 2}
    else:
        size = {"d_model": 64, "n_heads": 4, "n_loop": 2, "max_seq_len": 64}
        train = {"steps": 400, "micro_batch_size": 8, "log_interval": 20, "eval_interval": 400, "eval_iters": 8,
                 "warmup_steps": 20}
    out = []
    for name, arch in ARCHS.items():
        cfg = base_config(
            model={"vocab_size": data["vocab_size"], "loops": K, **size, **arch},
            loop={"mean": K},
            data={"data_path": data["data_path"], "split": data["split"], "seq_len": size["max_seq_len"],
                  "tokenizer_type": data["tokenizer_type"], "tokenizer_model": data["tokenizer_model"]},
            train={"lr": 3e-3, "min_lr": 3e-4, **train})
        out.append(Variant(name, cfg))
    return out, K


def run(ctx: Context) -> ClaimResult:
    vs, K = variants(ctx)
    runs = train_variants(ctx, ctx.claim_dir(NAME), vs)
    rows = []
    for name, r in runs.items():
        res = r.last_per_loop().get("residual_norm", [])
        gn = r.grad_norms()
        rows.append({
            "variant": name, "loops_K": K, "steps": max(r.train_losses() or [0]), "diverged": int(r.diverged),
            "final_train_loss": r.final_loss(), "valid_loss": r.final_valid_loss(),
            "residual_norm_loop1": res[0] if res else float("nan"),
            "residual_norm_loopK": res[-1] if res else float("nan"),
            "residual_growth": (res[-1] / res[0]) if res and res[0] > 0 else float("nan"),
            "max_grad_norm": max(gn.values()) if gn else float("nan"),
            "train_wall_s": round(r.wall_s, 1),
        })
    by = {row["variant"]: row for row in rows}
    lt, flt = by["LT"], by["FLT"]
    lt_grows = bool(lt["diverged"]) or lt["residual_growth"] >= GROWTH
    flt_bounded = not flt["diverged"] and flt["residual_growth"] < GROWTH
    lt_worse = bool(lt["diverged"]) or lt["final_train_loss"] >= flt["final_train_loss"]
    held = lt_grows and flt_bounded and lt_worse
    verdict = (f"flt_stability: {'HELD' if held else 'DID NOT HOLD'} at this scale (K={K}, {lt['steps']} steps): "
               f"||x(K)||/||x(1)|| LT {fmt(lt['residual_growth'])} ({'grows' if lt_grows else 'does not grow'}, "
               f"threshold {GROWTH}), FLT {fmt(flt['residual_growth'])} "
               f"({'bounded' if flt_bounded else 'not bounded'}); ||x(K)|| LT {fmt(lt['residual_norm_loopK'])} vs "
               f"FLT {fmt(flt['residual_norm_loopK'])}; final train loss LT {fmt(lt['final_train_loss'])} vs "
               f"FLT {fmt(flt['final_train_loss'])} ({'LT worse or diverged' if lt_worse else 'LT better'}); "
               f"LT_i {fmt(by['LT_i']['residual_growth'])}x / loss {fmt(by['LT_i']['final_train_loss'])}, "
               f"LT_ia {fmt(by['LT_ia']['residual_growth'])}x / loss {fmt(by['LT_ia']['final_train_loss'])}")

    def draw(fig):
        ax1, ax2, ax3 = fig.subplots(1, 3)
        for name, r in runs.items():
            losses = r.train_losses()
            steps = sorted(losses)
            w = max(1, len(steps) // 25)
            smooth = [sum(losses[s] for s in steps[max(0, i - w + 1): i + 1]) / len(steps[max(0, i - w + 1): i + 1])
                      for i in range(len(steps))]
            ax1.plot(steps, smooth, label=name + (" (diverged)" if r.diverged else ""))
            res = r.last_per_loop().get("residual_norm", [])
            ax2.plot(range(1, len(res) + 1), res, "o-", ms=3, label=name)
            pl = r.per_loop()
            ax3.plot(sorted(pl), [pl[k]["residual_norm"][-1] for k in sorted(pl)], label=name)
        ax1.set_xlabel("step")
        ax1.set_ylabel("training loss (moving mean)")
        ax1.legend()
        ax2.set_xlabel("loop k")
        ax2.set_ylabel("||x(k)|| (mean token norm, last logged step)")
        ax2.legend()
        ax3.set_xlabel("step")
        ax3.set_ylabel(f"||x(K={K})|| over training")
        ax3.set_yscale("log")
    return ClaimResult(rows, verdict, held, draw, figsize=(13, 3.8))
