"""Claim 1 (Fully Looped Transformer paper): the baseline looped transformer (LT) trained at many loops (K = 12)
ends far worse than the same LT at few loops (K = 3) and than the FLT at K = 12, with a much larger final-loop
residual norm ||x(K)|| and gradient spikes; the FLT at K = 12 does not.

Why these measurements: every loop of every variant restarts from norm(x) (the reference does the same), so
||x(K)|| / ||x(1)|| is ~1 by construction and says nothing. The paper's effect is a K-dependent gap, measured here
against the K = 3 control and the FLT at the same K:
- loss gap: final training loss (mean of the last 20% of steps) of LT@12 minus LT@3, and LT@12 minus FLT@12;
- norm gap: ||x(K)|| (the mean token norm of the un-normalized last-loop output, the trainer's per-loop
  diagnostics at the last logged step) of LT@12 over LT@3, and LT@12 over FLT@12;
- gradient spikes: max / median of the per-step gradient norm after the first 20 steps (the large early
  gradients every variant has at the start, at full lr: the reference has no warm-up), LT@12 over FLT@12.
The claim holds if every gap is at least its threshold (a diverged LT@12 counts as every gap met) for every
seed. Reported, not judged (`train.diag_interval`, megaloop/training/diagnostics.py, which does not change
training): at the last diagnostic step, how much the final state depends on the input (input_dependence), the
loop map's spectral norm, and the gradient reaching loop 1 over that reaching loop K (the per-loop
contributions to the block's gradient, all groups: what the reference's check.sh logs per loop). An
exploratory run (seed 7, 300 steps) showed the mechanism at this scale: LT@12's loop map is contractive
(spectral norm ~0.2), its final state nearly ignores the input (0.014 vs 0.67 for FLT@12) and loop 1 gets
~1e-12 of loop K's gradient: a vanishing gradient and an input-independent fixed point, not spikes.
At --scale gpu LT_i@12 and LT_ia@12 (the paper's ablations, one config field apart) are trained too and
reported, not judged.

All variants use the FLT reference recipe (`model.recipe: flt_reference`: the FLT repository's nanochat block
and init; megaloop/config/recipes.py) on the demo corpus, R = K fixed, loss on the last loop (the reference's
`--loss_type END`), and the reference's optimizer and schedule (`train.optimizer: muon`: Muon at lr 0.02,
momentum 0.95 for the layers' matrices, AdamW for embedding and head; no warm-up, a linear warm-down over the
last 20% of steps to 0, clip 1, no weight decay). The AdamW at train.lr for embedding and head is this
claim's (the reference scales its own per-group AdamW rates with the width). ../shared/reference_recipes.md
has what was observed at this scale.

Why the reference's optimizer: with AdamW (lr 3e-3, cosine, 2,000 steps; seeds 1234, 1235) LT@12 showed
the loss and norm gaps with wide margins but no gradient spikes (grad-norm max / median 2.6 and 2.3 vs 4.0
and 4.7 for FLT@12): its loop map shrank to a contraction and its gradient vanished. Trained with Muon, whose
orthogonalised step has a fixed size however small the gradient, LT@12's residual grows without bound and
its gradient norm spikes, the collapse the paper describes. Probes before the change (seeds 7 and 8, not
reported seeds; 600 steps, benchmarks-style in-process loop): LT@12's grad-norm max / median 37.8 (AdamW
rate for embedding / head 3e-3; 427 with the reference's width-scaled rates) and 100 (seed 8), FLT@12 3.6,
LT@3 2.4; ||x(K)|| ~2,700 for LT@12 vs 217 for FLT@12; loss 5.67 vs 3.72 and 3.95 (LT@3).
Measured (seeds 1234, 1235, 2026-12-07, 28 minutes with --jobs 2 on 2 cores): HELD for both seeds, loss gaps
2.3 / 2.5 nats, ||x(K)|| 13-19x LT@3's and 17-25x FLT@12's, grad-norm max / median 212 and 8,960 for LT@12
(all its steps above 10x its median in steps 50-187, while it collapses) vs 3.8 and 4.0 for FLT@12.

--scale gpu: the reference's block size (d 384, 6 layers, 3 heads of 128) at sequence 512, batch 32, 300
steps, bf16, on a 16 MB demo corpus, LT_i and LT_ia included; sized for ~15 minutes of one H100 for the five
variants per seed (an estimate from the FLOPs: not yet timed).
Expected there, as in the paper's check.sh at K = 12: LT@12 plateaus well above LT@3 and FLT@12, with
||x(K)|| an order of magnitude larger and grad-norm spikes; it has not been run on a GPU by this project yet.
"""
from __future__ import annotations

import math
import statistics

from megaloop.reproduce.runner import ClaimResult, Context, Variant, base_config, demo_corpus, fmt, train_variants

NAME = "flt_stability"
SUMMARY = ("LT at K=3 and K=12 vs FLT at K=12 (LT_i, LT_ia too at --scale gpu) on the demo corpus, FLT reference "
           "recipe: gaps in loss, final-loop residual norm ||x(K)|| and gradient spikes")
LOSS_GAP = 0.3  # nats: LT@12 at least this much above LT@3 and above FLT@12
NORM_RATIO = 3.0  # ||x(K)|| of LT@12 at least this many times LT@3's and FLT@12's
SPIKE_RATIO = 1.5  # LT@12's (max / median grad norm after warm-up) at least this many times FLT@12's

ARCHS = {"LT": {"arch": "recurrent", "injection": "none", "normalization": "outer"},
         "LT_i": {"arch": "lt_i"}, "LT_ia": {"arch": "lt_ia"}, "FLT": {"arch": "flt"}}
K_LOW, K_HIGH = 3, 12
# The reference's optimizer and schedule (scripts/base_train.py of the FLT repository): Muon for the matrices,
# no warm-up, 20% linear warm-down to 0, clip 1, no weight decay.
REFERENCE_OPTIMIZER = {"optimizer": "muon", "muon_lr": 0.02, "muon_momentum": 0.95, "warmup_steps": 0,
                       "lr_schedule": "wsd", "wsd_decay_fraction": 0.2, "min_lr": 0.0, "weight_decay": 0.0,
                       "grad_clip": 1.0}


def settings(ctx: Context) -> dict:
    if ctx.quick:
        return {"size": {"d_model": 32, "n_heads": 2, "n_loop": 1, "max_seq_len": 32},
                "train": {"steps": 12, "micro_batch_size": 4, "log_interval": 4, "eval_interval": 12,
                          "eval_iters": 2, "diag_interval": 6, **REFERENCE_OPTIMIZER},
                "lr": 3e-3, "runs": [("LT", K_LOW), ("LT", K_HIGH), ("FLT", K_HIGH)]}
    runs = [("LT", K_LOW), ("LT", K_HIGH), ("FLT", K_HIGH)]
    if ctx.scale == "gpu":
        runs += [("LT_i", K_HIGH), ("LT_ia", K_HIGH)]
        return {"size": {"d_model": 384, "n_heads": 3, "n_loop": 6, "max_seq_len": 512},
                "train": {"steps": 300, "micro_batch_size": 32, "log_interval": 10, "eval_interval": 300,
                          "eval_iters": 8, "precision": "bf16", "diag_interval": 50, **REFERENCE_OPTIMIZER},
                "lr": 1e-3, "runs": runs}
    # 2,000 steps as the reference's check.sh (~9-10 minutes per K=12 variant on a CPU core). The ablations
    # are left to --scale gpu.
    return {"size": {"d_model": 64, "n_heads": 4, "n_loop": 2, "max_seq_len": 64},
            "train": {"steps": 2000, "micro_batch_size": 8, "log_interval": 10, "eval_interval": 500, "eval_iters": 8,
                      "diag_interval": 100, **REFERENCE_OPTIMIZER},
            "lr": 3e-3, "runs": runs}


def variants(ctx: Context):
    data = demo_corpus(ctx)
    s = settings(ctx)
    out = []
    for arch, K in s["runs"]:
        cfg = base_config(
            model={"vocab_size": data["vocab_size"], "loops": K, "recipe": "flt_reference", **s["size"],
                   **ARCHS[arch]},
            loop={"mean": K, "loss": "last"},
            data={"data_path": data["data_path"], "split": data["split"], "seq_len": s["size"]["max_seq_len"],
                  "tokenizer_type": data["tokenizer_type"], "tokenizer_model": data["tokenizer_model"]},
            train={"lr": s["lr"], "min_lr": s["lr"] / 10, **s["train"]})
        out.append(Variant(f"{arch}_K{K}", cfg))
    return out, s


def spike_window_start(train: dict) -> int:
    """The step after which gradient spikes count: past the warm-up and the first 20 steps (fewer in a
    --quick run)."""
    return max(train.get("warmup_steps", 0), min(20, train["steps"] // 10))


def spike_ratio(run, start: int) -> float:
    """max / median of the per-step gradient norm after step `start` (inf if the run diverged)."""
    if run.diverged:
        return float("inf")
    norms = [v for s, v in sorted(run.grad_norms().items()) if s > start]
    med = statistics.median(norms) if norms else float("nan")
    return max(norms) / med if norms and med > 0 else float("nan")


def loop1_over_loopK(diag: dict) -> float:
    """The norm of loop 1's contribution to the looped block's gradient over loop K's (all parameter groups
    together), from a diagnostics row; NaN without one."""
    g = diag.get("grad_norm") or []
    if len(g) < 2:
        return float("nan")
    first, last = (math.sqrt(sum(v * v for v in g[i])) for i in (0, -1))
    return first / last if last > 0 else float("nan")


def measure(name: str, K: int, r, spike_start: int) -> dict:
    res = r.last_per_loop().get("residual_norm", [])
    diag = r.last_diagnostics()
    per_loop = r.per_loop()
    final_norms = [pl["residual_norm"][-1] for pl in per_loop.values() if pl.get("residual_norm")]
    return {"variant": name, "loops_K": K, "steps": max(r.train_losses() or [0]), "diverged": int(r.diverged),
            "final_train_loss": r.final_loss(), "valid_loss": r.final_valid_loss(),
            "residual_norm_loop1": res[0] if res else float("nan"),
            "residual_norm_loopK": float("inf") if r.diverged else (res[-1] if res else float("nan")),
            "max_residual_norm_loopK": max(final_norms) if final_norms else float("nan"),
            "residual_growth": (res[-1] / res[0]) if res and res[0] > 0 else float("nan"),
            "grad_spike_ratio": spike_ratio(r, spike_start),
            "input_dependence": diag.get("input_dependence", float("nan")),
            "loop_map_spectral_norm": diag.get("loop_map_spectral_norm", float("nan")),
            "grad_loop1_over_loopK": loop1_over_loopK(diag),
            "max_grad_norm": max(r.grad_norms().values()) if r.grad_norms() else float("nan"),
            "train_wall_s": round(r.wall_s, 1)}


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 else float("nan")


def run(ctx: Context) -> ClaimResult:
    vs, s = variants(ctx)
    runs = train_variants(ctx, ctx.claim_dir(NAME), vs)
    start = spike_window_start(s["train"])
    rows = [measure(v.name, v.config["model"]["loops"], runs[v.name], start) for v in vs]
    by = {row["variant"]: row for row in rows}
    lo, hi, flt = by[f"LT_K{K_LOW}"], by[f"LT_K{K_HIGH}"], by[f"FLT_K{K_HIGH}"]
    head = {"loss LT@12-LT@3": hi["final_train_loss"] - lo["final_train_loss"],
            "loss LT@12-FLT@12": hi["final_train_loss"] - flt["final_train_loss"],
            "||x(K)|| LT@12/LT@3": _ratio(hi["residual_norm_loopK"], lo["residual_norm_loopK"]),
            "||x(K)|| LT@12/FLT@12": _ratio(hi["residual_norm_loopK"], flt["residual_norm_loopK"]),
            "spikes LT@12/FLT@12": _ratio(hi["grad_spike_ratio"], flt["grad_spike_ratio"])}
    diverged = bool(hi["diverged"])
    checks = {"loss gap": diverged or (head["loss LT@12-LT@3"] >= LOSS_GAP and head["loss LT@12-FLT@12"] >= LOSS_GAP),
              "norm gap": diverged or min(head["||x(K)|| LT@12/LT@3"], head["||x(K)|| LT@12/FLT@12"]) >= NORM_RATIO,
              "spikes": diverged or head["spikes LT@12/FLT@12"] >= SPIKE_RATIO}
    held = all(checks.values())
    failed = [k for k, ok in checks.items() if not ok]
    ablations = ", ".join(f"{n} loss {fmt(by[n]['final_train_loss'])} ||x(K)|| {fmt(by[n]['residual_norm_loopK'])}"
                          for n in (f"LT_i_K{K_HIGH}", f"LT_ia_K{K_HIGH}") if n in by)
    verdict = (f"{NAME}: {'HELD' if held else 'DID NOT HOLD'} at this scale ({hi['steps']} steps, d "
               f"{s['size']['d_model']}; {'every gap met' if held else 'not met: ' + ', '.join(failed)}): final loss "
               f"LT@{K_LOW} {fmt(lo['final_train_loss'])}, LT@{K_HIGH} {fmt(hi['final_train_loss'])}, FLT@{K_HIGH} "
               f"{fmt(flt['final_train_loss'])} (gaps {fmt(head['loss LT@12-LT@3'])} and "
               f"{fmt(head['loss LT@12-FLT@12'])}, threshold {LOSS_GAP}); ||x(K)|| {fmt(lo['residual_norm_loopK'])}, "
               f"{fmt(hi['residual_norm_loopK'])}, {fmt(flt['residual_norm_loopK'])} (LT@{K_HIGH} "
               f"{fmt(head['||x(K)|| LT@12/LT@3'])}x LT@{K_LOW}, {fmt(head['||x(K)|| LT@12/FLT@12'])}x FLT, "
               f"threshold {NORM_RATIO}x); grad-norm max/median {fmt(lo['grad_spike_ratio'])}, "
               f"{fmt(hi['grad_spike_ratio'])}, {fmt(flt['grad_spike_ratio'])} (LT@{K_HIGH} / FLT "
               f"{fmt(head['spikes LT@12/FLT@12'])}, threshold {SPIKE_RATIO}); not judged, at the last diagnostic "
               f"step, LT@{K_LOW} / LT@{K_HIGH} / FLT@{K_HIGH}: input dependence "
               + " / ".join(fmt(x["input_dependence"]) for x in (lo, hi, flt)) + ", loop-map spectral norm "
               + " / ".join(fmt(x["loop_map_spectral_norm"]) for x in (lo, hi, flt)) + ", gradient loop 1 / loop K "
               + " / ".join(fmt(x["grad_loop1_over_loopK"]) for x in (lo, hi, flt))
               + (f"; {ablations}" if ablations else ""))

    def draw(fig):
        ax1, ax2, ax3, ax4 = fig.subplots(1, 4)
        for v in vs:
            r = runs[v.name]
            losses = r.train_losses()
            steps = sorted(losses)
            w = max(1, len(steps) // 25)
            smooth = [sum(losses[t] for t in steps[max(0, i - w + 1): i + 1]) / len(steps[max(0, i - w + 1): i + 1])
                      for i in range(len(steps))]
            ax1.plot(steps, smooth, label=v.name + (" (diverged)" if r.diverged else ""))
            res = r.last_per_loop().get("residual_norm", [])
            ax2.plot(range(1, len(res) + 1), res, "o-", ms=3, label=v.name)
            pl = r.per_loop()
            ax3.plot(sorted(pl), [pl[k]["residual_norm"][-1] for k in sorted(pl)], label=v.name)
            gn = r.grad_norms()
            ax4.plot(sorted(gn), [gn[k] for k in sorted(gn)], lw=0.7, label=v.name)
        ax1.set_xlabel("step")
        ax1.set_ylabel("training loss (moving mean)")
        ax1.legend(fontsize=7)
        ax2.set_xlabel("loop k")
        ax2.set_ylabel("||x(k)|| (last logged step)")
        ax2.set_yscale("log")
        ax3.set_xlabel("step")
        ax3.set_ylabel("||x(K)|| over training")
        ax3.set_yscale("log")
        ax4.set_xlabel("step")
        ax4.set_ylabel("gradient norm (before clipping)")
        ax4.set_yscale("log")
    return ClaimResult(rows, verdict, held, draw, figsize=(16, 3.8), headline=head)
