"""Seeds and spread: every claim runs once per seed (`tools/reproduce.py CLAIM --seeds 1234,1235`), and its
verdict holds only if it holds for every seed.

A seed goes into `train.seed` of every variant, which also seeds the synthetic task's training examples
(megaloop/training/data.py: the task is built with train.seed, its validation stream with train.seed + 1) and the
GPT-style sampling of the demo corpus. `combine` merges the per-seed `ClaimResult`s: summary rows get a `seed`
column, the mean ± spread of the numbers each verdict compares (`ClaimResult.headline`) leads the verdict, and a
figure row per seed. Spread is half the range over the seeds ((max - min) / 2): with two seeds, each lies at
mean ± spread.
"""
from __future__ import annotations

import math
from typing import Dict, List, Sequence, Tuple

from megaloop.errors import UsageError

DEFAULT_SEEDS = (1234,)  # base_config's train.seed: a run without --seeds is unchanged


def parse_seeds(text: str) -> Tuple[int, ...]:
    """'1234,1235' -> (1234, 1235); a UsageError naming the flag for anything else."""
    try:
        seeds = tuple(int(s) for s in str(text).split(",") if s.strip())
    except ValueError:
        seeds = ()
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise UsageError(f"--seeds {text!r}: give distinct non-negative integers separated by commas, "
                         f"e.g. --seeds 1234,1235")
    return seeds


def seeded(config: dict, seed: int) -> dict:
    """The variant's config trained with `seed` (train.seed; a task's own data seed too if its config names one)."""
    from megaloop.reproduce.runner import deep_update

    out = deep_update(config, {"train": {"seed": seed}})
    params = out.get("data", {}).get("task_params")
    if isinstance(params, dict) and "seed" in params:
        params["seed"] = seed
    return out


def mean_spread(values: Sequence[float]) -> Tuple[float, float]:
    """(mean, half the range) of the per-seed values; a diverged seed (inf) makes the mean inf, a NaN makes NaN."""
    vals = [float(v) for v in values]
    if not vals or any(math.isnan(v) for v in vals):
        return float("nan"), float("nan")
    if any(math.isinf(v) for v in vals):
        return sum(vals) / len(vals), float("nan")
    return sum(vals) / len(vals), (max(vals) - min(vals)) / 2


def fmt_spread(values: Sequence[float], digits: int = 3) -> str:
    """'4.55 ± 0.03' over the seeds (just the value for one seed)."""
    from megaloop.reproduce.runner import fmt

    if len(values) == 1:
        return fmt(float(values[0]), digits)
    m, s = mean_spread(values)
    return f"{fmt(m, digits)} ± {fmt(s, 2)}" if not math.isnan(s) else f"{fmt(m, digits)} (per seed " \
        + ", ".join(fmt(float(v), digits) for v in values) + ")"


def _body(claim: str, verdict: str) -> str:
    """A per-seed verdict without its leading 'claim: '."""
    return verdict[len(claim) + 2:] if verdict.startswith(claim + ": ") else verdict


def _mean_row(rows: List[dict]) -> dict:
    """One summary row over the seeds: a column equal in every seed keeps its value; a numeric one that differs
    becomes 'mean ± spread'."""
    out = {}
    for key in rows[0]:
        vals = [r.get(key) for r in rows]
        if all(v == vals[0] for v in vals):
            out[key] = vals[0]
        elif all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals):
            out[key] = fmt_spread(vals)
        else:
            out[key] = " / ".join(str(v) for v in vals)
    return out


def combine(claim: str, seeds: Sequence[int], results: list):
    """One ClaimResult from the per-seed ones (results[i] ran with seeds[i]): held only if held for every seed."""
    from megaloop.reproduce.runner import ClaimResult

    rows = [{"seed": seed, **row} for seed, res in zip(seeds, results) for row in res.rows]
    held = all(res.held for res in results)
    if len(results) == 1:
        res = results[0]
        return ClaimResult(rows, res.verdict, held, res.draw, res.figsize, res.headline,
                           per_seed={k: [v] for k, v in res.headline.items()}, seed_verdicts=[res.verdict])
    names: Dict[str, List[float]] = {}
    for res in results:
        for key, value in res.headline.items():
            names.setdefault(key, []).append(value)
    numbers = "; ".join(f"{k} {fmt_spread(v)}" for k, v in names.items() if len(v) == len(results))
    holds_for = [str(seed) for seed, res in zip(seeds, results) if res.held]
    which = ("for every seed" if held else
             f"(held for seed {', '.join(holds_for)} only)" if holds_for else "(held for no seed)")
    verdict = (f"{claim}: {'HELD' if held else 'DID NOT HOLD'} at this scale {which} "
               f"(seeds: {', '.join(map(str, seeds))}; mean ± spread over seeds"
               f"{': ' + numbers if numbers else ''}) | "
               + " | ".join(f"seed {seed}: {_body(claim, res.verdict)}" for seed, res in zip(seeds, results)))
    mean_rows = [_mean_row([res.rows[i] for res in results]) for i in range(len(results[0].rows))] \
        if len({len(res.rows) for res in results}) == 1 else None

    def draw(fig):
        subs = fig.subfigures(len(results), 1)
        for seed, res, sub in zip(seeds, results, subs):
            res.draw(sub)
            sub.suptitle(f"seed {seed}: {'held' if res.held else 'did not hold'}", fontsize=9)

    w, h = results[0].figsize
    return ClaimResult(rows, verdict, held, draw, (w, h * len(results)),
                       {k: mean_spread(v)[0] for k, v in names.items()}, per_seed=names,
                       seed_verdicts=[res.verdict for res in results], mean_rows=mean_rows)
