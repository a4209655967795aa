"""Claim 3 (Parcae): with its stable diagonal injection (max |Abar| < 1) the looped state stays bounded at
large R and high learning rate, where additive injection s(t+1) = Block(s(t) + e) makes it grow.

Variants: injection add vs parcae, each at two learning rates, everything else as yaml_configs/tiny/parcae.yaml
(prelude / looped block / coda, inner normalization so the state itself is never normalized, noise initial
state, gradients through the last 4 loops), R fixed and large, on the demo corpus. Measured from the
trainer's metrics.jsonl: the per-loop recurrent state norm ||h(t)|| at the last logged step (its growth over the
second half of the loops, ||h(R)|| / ||h(R/2)||), the last loop's state norm over training, and the loss.

--scale gpu (not run on a GPU by this project yet): d 256, 4 heads, sequence 256, batch 32, R = 32 with
gradients through the last 4 loops, 1,000 steps in bf16 on the 16 MB demo corpus, the same two learning
rates; sized for about 15 minutes of one H100 for the four variants per seed (an estimate: at this width a
step is bound by kernel launches, ~0.1 s for 32 loops of 2 layers, not by FLOPs). Expected, as in the Parcae
paper: additive injection's state grows with the loop count (or the run diverges at lr 1e-2), Parcae's
stays bounded with max|Abar| < 1.
"""
from __future__ import annotations

from megaloop.reproduce.runner import ClaimResult, Context, Variant, base_config, demo_corpus, fmt, train_variants

NAME = "parcae_injection"
SUMMARY = "add vs parcae injection at large R and high learning rate on the demo corpus: recurrent state norm and loss"
# Late growth ||h(R)|| / ||h(R/2)||: a state that converges (Parcae's contraction) tends to 1, one that grows
# linearly in t (additive injection, inner norm) to 2. At or above GROWTH counts as "grows", below as "bounded".
GROWTH = 1.25


def settings(ctx: Context) -> dict:
    if ctx.quick:
        return {"R": 8, "lrs": (3e-3, 1e-2), "d_model": 32, "n_heads": 2, "seq": 32, "steps": 8, "batch": 4}
    if ctx.scale == "gpu":
        return {"R": 32, "lrs": (3e-3, 1e-2), "d_model": 256, "n_heads": 4, "seq": 256, "steps": 1000, "batch": 32,
                "precision": "bf16"}
    return {"R": 16, "lrs": (3e-3, 1e-2), "d_model": 64, "n_heads": 4, "seq": 64, "steps": 300, "batch": 8}


def run(ctx: Context) -> ClaimResult:
    s = settings(ctx)
    data = demo_corpus(ctx)
    R = s["R"]
    vs = []
    for lr in s["lrs"]:
        for inj in ("add", "parcae"):
            cfg = base_config(
                model={"vocab_size": data["vocab_size"], "d_model": s["d_model"], "n_heads": s["n_heads"],
                       "max_seq_len": s["seq"], "n_prelude": 1, "n_loop": 2, "n_coda": 1, "loops": R,
                       "mlp": "relu2", "qk_norm": True, "injection": inj, "normalization": "inner",
                       "state_init": "noise"},
                loop={"mean": R, "max": R, "backprop_loops": 4},
                data={"data_path": data["data_path"], "split": data["split"], "seq_len": s["seq"],
                      "tokenizer_type": data["tokenizer_type"], "tokenizer_model": data["tokenizer_model"]},
                train={"steps": s["steps"], "micro_batch_size": s["batch"], "lr": lr, "min_lr": lr / 10,
                       "log_interval": max(1, s["steps"] // 20), "precision": s.get("precision", "fp32")})
            vs.append(Variant(f"{inj}_lr{lr:g}", cfg))
    runs = train_variants(ctx, ctx.claim_dir(NAME), vs)
    rows = []
    for v in vs:
        r = runs[v.name]
        state = r.last_per_loop().get("state_norm", [])
        last_state = [pl["state_norm"][-1] for pl in r.per_loop().values()]
        sn = [row["injection_spectral_norm"] for row in r.rows if "injection_spectral_norm" in row]
        rows.append({"variant": v.name, "injection": v.config["model"]["injection"], "lr": v.config["train"]["lr"],
                     "loops_R": R, "steps": max(r.train_losses() or [0]), "diverged": int(r.diverged),
                     "final_train_loss": r.final_loss(),
                     "state_norm_loop1": state[0] if state else float("nan"),
                     "state_norm_loopR": state[-1] if state else float("nan"),
                     "state_norm_loop_half": state[R // 2 - 1] if state else float("nan"),
                     "state_growth": state[-1] / state[R // 2 - 1] if state and state[R // 2 - 1] > 0 else float("nan"),
                     "max_state_norm_loopR": max(last_state) if last_state else float("nan"),
                     "injection_spectral_norm": sn[-1] if sn else float("nan"),
                     "train_wall_s": round(r.wall_s, 1)})
    by = {row["variant"]: row for row in rows}
    parts, held = [], True
    for lr in s["lrs"]:
        add, par = by[f"add_lr{lr:g}"], by[f"parcae_lr{lr:g}"]
        add_grows = bool(add["diverged"]) or add["state_growth"] >= GROWTH
        par_bounded = not par["diverged"] and par["state_growth"] < GROWTH
        held = held and add_grows and par_bounded
        parts.append(f"lr {lr:g}: ||h({R})||/||h({R // 2})|| add {fmt(add['state_growth'])} "
                     f"({'grows' if add_grows else 'does not grow'}) vs parcae {fmt(par['state_growth'])} "
                     f"({'bounded' if par_bounded else 'not bounded'}), loss add {fmt(add['final_train_loss'])} vs "
                     f"parcae {fmt(par['final_train_loss'])}, parcae max|Abar| {fmt(par['injection_spectral_norm'])}")
    verdict = (f"parcae_injection: {'HELD' if held else 'DID NOT HOLD'} at this scale (R={R}, {s['steps']} steps, "
               f"growth threshold {GROWTH}): " + "; ".join(parts))

    def draw(fig):
        ax1, ax2, ax3 = fig.subplots(1, 3)
        for v in vs:
            r = runs[v.name]
            style = "-" if v.config["model"]["injection"] == "parcae" else "--"
            state = r.last_per_loop().get("state_norm", [])
            ax1.plot(range(1, len(state) + 1), state, style, marker="o", ms=3, label=v.name)
            pl = r.per_loop()
            ax2.plot(sorted(pl), [pl[k]["state_norm"][-1] for k in sorted(pl)], style, label=v.name)
            losses = r.train_losses()
            ax3.plot(sorted(losses), [losses[k] for k in sorted(losses)], style, lw=0.8,
                     label=v.name + (" (diverged)" if r.diverged else ""))
        ax1.set_xlabel("loop t")
        ax1.set_ylabel("||h(t)|| (last logged step)")
        ax1.set_yscale("log")
        ax2.set_xlabel("step")
        ax2.set_ylabel(f"||h(R={R})|| over training")
        ax2.set_yscale("log")
        ax3.set_xlabel("step")
        ax3.set_ylabel("training loss")
        ax1.legend(fontsize=7)
        ax3.legend(fontsize=7)
    return ClaimResult(rows, verdict, held, draw, figsize=(13, 3.8))
