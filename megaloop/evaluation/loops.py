"""Quality as a function of test-time loops: the mean NLL (perplexity) of token windows, or a synthetic
task's exact-match accuracy, at each loop count R and for each exit strategy (strategy:threshold), on one
process. tools/eval_loops.py prints and writes these rows; the trainer's validation
(megaloop/training/evaluation.py) parses train.eval_exits with `parse_exit` and counts exact matches with
the same megaloop.tasks.exact_match_counts.

Rows: {"mode": "fixed" | strategy, "threshold": text, "loops": R, "avg_loops", "nll", "ppl"} plus, on a
task, "exact_match_sequence" and "exact_match_position". Each exit is evaluated at the largest loop count
and reports the average number of loops used.
"""
from __future__ import annotations

import dataclasses
import json
import math
import sys

from megaloop.errors import UsageError

EXIT_STRATEGIES = ("kl", "q_exit")


def parse_loops(spec, train_loops):
    """'1-8', '1,2,4,8' or '1-4,8' -> sorted loop counts (each >= 1); ValueError naming --loops otherwise."""
    if spec is None:
        return list(range(1, 2 * train_loops + 1))
    out = []
    for part in spec.split(","):
        part = part.strip()
        try:
            if "-" in part:
                a, b = (int(v) for v in part.split("-"))
                if a > b:
                    raise UsageError(f"--loops {spec!r}: the range {part!r} is empty (write low-high, e.g. {b}-{a})")
                out.extend(range(a, b + 1))
            else:
                out.append(int(part))
        except ValueError as e:
            if isinstance(e, UsageError):
                raise
            raise UsageError(f"--loops {spec!r}: {part!r} is not a loop count or a low-high range; write e.g. 1-8 "
                             f"or 1,2,4,8") from None
    if not out or min(out) < 1:
        raise UsageError(f"--loops {spec!r}: loop counts must be at least 1")
    return sorted(set(out))


def parse_exit(item, where="--exits", error=UsageError):
    """'kl:1e-3' -> ("kl", "1e-3", 0.001); `error` (a UsageError, or the config's ConfigError) naming `where`
    otherwise."""
    strategy, _, thr = item.partition(":")
    if strategy not in EXIT_STRATEGIES:
        raise error(f"{where} {item!r}: unknown strategy {strategy!r}; use one of {', '.join(EXIT_STRATEGIES)} "
                    f"as strategy:threshold, e.g. kl:1e-3")
    try:
        threshold = float(thr) if thr else None
    except ValueError:
        threshold = math.nan
    if threshold is not None and not math.isfinite(threshold):
        raise error(f"{where} {item!r}: the threshold {thr!r} is not a finite number; e.g. {strategy}:1e-3")
    return strategy, thr, threshold


def evaluate(lm, batches, loops, exit=None, threshold=None):
    """(mean NLL per token, average loops used)."""
    import torch
    import torch.nn.functional as F

    from megaloop.generation import forward_logits

    nll, count, loop_sum = 0.0, 0, 0.0
    with torch.no_grad():
        for x, y in batches:
            torch.manual_seed(0)  # a fixed draw for a megaloop model's noise initial state
            logits, exit_loops = forward_logits(lm, x, loops, exit, threshold)
            nll += F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum").item()
            count += y.numel()
            loop_sum += float(exit_loops.float().sum()) if exit_loops is not None else loops * y.numel()
    return nll / count, loop_sum / count


def text_rows(lm, batches, loop_counts, exits):
    """The rows of a text evaluation: each R of loop_counts, then each exit (item, (strategy, thr, threshold))
    at the largest R (q_exit skipped, with a note, for a model without an exit gate)."""
    rows = []
    for r in loop_counts:
        nll, used = evaluate(lm, batches, r)
        rows.append({"mode": "fixed", "threshold": "", "loops": r, "avg_loops": used, "nll": nll,
                     "ppl": math.exp(nll)})
    r_max = max(loop_counts)
    for item, (strategy, thr, threshold) in exits:
        if strategy == "q_exit" and not lm.has_exit_gate:
            print(f"skipping {item}: the model has no exit gate", file=sys.stderr)
            continue
        nll, used = evaluate(lm, batches, r_max, strategy, threshold)
        rows.append({"mode": strategy, "threshold": thr, "loops": r_max, "avg_loops": used, "nll": nll,
                     "ppl": math.exp(nll)})
    return rows


# ------------------------------------------------------------------------------------------------
# Tasks (data.task)


def task_spec(cfg, task=None, task_params=None, task_seed=None):
    """(name, params, seed) of the task to score: --task / --task-params / --task-seed, else the run's data.task
    with its data.task_params and the trainer's validation seed train.seed + 1. None: not a task evaluation."""
    name = task or (cfg.data.task if cfg is not None else None)
    if not name:
        return None
    if task_params is not None:
        try:
            params = json.loads(task_params)
        except ValueError:
            params = None
        if not isinstance(params, dict):
            raise UsageError(f"--task-params {task_params!r}: give a JSON object, e.g. '{{\"length\": 16}}'")
    else:
        params = dict(cfg.data.task_params) if cfg is not None and cfg.data.task == name else {}
    seed = task_seed if task_seed is not None else (cfg.train.seed + 1 if cfg is not None else 1)
    return name, params, seed


def make_task(name, params, seed, **change):
    from megaloop.tasks import build_task

    try:
        return build_task(name, seed=seed, **{**params, **change})
    except (TypeError, ValueError) as e:
        raise UsageError(f"task {name!r} with parameters {params}: {e}") from None


def fit_length(lm, seq_len):
    """Let the model run sequences of seq_len tokens: megaloop's max_seq_len is a guard (RoPE is computed for
    any position), raised here for the evaluation; an exported model keeps its own limit."""
    if seq_len <= lm.max_seq_len:
        return
    if lm.kind != "megaloop":
        raise UsageError(f"task sequences of {seq_len} tokens exceed the exported model's max_seq_len="
                         f"{lm.max_seq_len}: evaluate the training checkpoint instead, or shorter --lengths")
    lm.model.cfg = dataclasses.replace(lm.model.cfg, max_seq_len=seq_len)
    lm.max_seq_len = seq_len


def evaluate_task(lm, task, num_examples, batch_size, loops, exit=None, threshold=None):
    """Score task examples 0 .. num_examples-1 (megaloop.tasks.TaskDataset, collated as the trainer does) at
    `loops` (and an exit): {"nll": mean NLL per answer position, "avg_loops": mean loops per answer
    position, "exact_match_sequence", "exact_match_position"} from megaloop.tasks.exact_match_counts,
    the counts the trainer's validation sums."""
    import torch
    import torch.nn.functional as F

    from megaloop.data.sampler import collate_samples
    from megaloop.generation import forward_logits
    from megaloop.tasks import TaskDataset, exact_match_counts, task_inputs_and_labels

    fit_length(lm, task.seq_len)
    ds = TaskDataset(task, num_examples)
    counts, nll, loop_sum = [0, 0, 0, 0], 0.0, 0.0
    with torch.no_grad():
        for start in range(0, num_examples, batch_size):
            batch = collate_samples([ds[i] for i in range(start, min(start + batch_size, num_examples))])
            tokens, labels = task_inputs_and_labels(batch)
            torch.manual_seed(0)  # a fixed draw for a megaloop model's noise initial state
            logits, exit_loops = forward_logits(lm, tokens, loops, exit, threshold)
            counts = [a + b for a, b in zip(counts, exact_match_counts(logits, labels))]
            answer = labels >= 0
            nll += F.cross_entropy(logits[answer].float(), labels[answer], reduction="sum").item()
            loop_sum += float(exit_loops[answer].float().sum()) if exit_loops is not None else loops * int(answer.sum())
    sr, sn, pr, pn = counts
    return {"nll": nll / max(pn, 1), "avg_loops": loop_sum / max(pn, 1),
            "exact_match_sequence": sr / max(sn, 1), "exact_match_position": pr / max(pn, 1)}


def parse_lengths(spec, train_length):
    """'32,64,128' -> sorted lengths; default n, 2n, 4n."""
    if spec is None:
        return [train_length, 2 * train_length, 4 * train_length]
    try:
        out = sorted({int(v) for v in spec.split(",") if v.strip()})
    except ValueError:
        raise UsageError(f"--lengths {spec!r}: give task lengths as a comma list, e.g. 16,32,64") from None
    if not out or out[0] < 1:
        raise UsageError(f"--lengths {spec!r}: lengths must be at least 1")
    return out


def task_tables(lm, spec, loop_counts, exits, num_examples, batch_size, lengths=None):
    """(rows at the task's own parameters: fixed loops then exits, the length grid or None). exits: (item,
    (strategy, thr, threshold)) pairs; lengths: the grid's spec ('16,32', default n, 2n, 4n)."""
    name, params, seed = spec
    task = make_task(name, params, seed)
    if "length" not in task.params() and lengths is not None:
        raise UsageError(f"--lengths: task {name!r} has no length parameter (it takes {sorted(task.params())})")
    if lm.vocab_size and task.vocab_size > lm.vocab_size:
        raise UsageError(f"task {name!r} {params} uses {task.vocab_size} token ids but the model has {lm.vocab_size}")
    n = num_examples
    grid_tasks = None
    if "length" in task.params():
        grid_lengths = parse_lengths(lengths, task.params()["length"])
        grid_tasks = {length: make_task(name, params, seed, length=length) for length in grid_lengths}
        fit_length(lm, max(t.seq_len for t in grid_tasks.values()))  # (refused before any work if it cannot)
    rows = []
    for r in loop_counts:
        rows.append({"mode": "fixed", "threshold": "", "loops": r,
                     **evaluate_task(lm, task, n, batch_size, r)})
    r_max = max(loop_counts)
    for item, (strategy, thr, threshold) in exits:
        if strategy == "q_exit" and not lm.has_exit_gate:
            print(f"skipping {item}: the model has no exit gate", file=sys.stderr)
            continue
        rows.append({"mode": strategy, "threshold": thr, "loops": r_max,
                     **evaluate_task(lm, task, n, batch_size, r_max, strategy, threshold)})
    for row in rows:
        row["ppl"] = math.exp(min(row["nll"], 700.0))
    if grid_tasks is None:
        return rows, None
    train_length = task.params()["length"]
    cells = []
    for length, length_task in grid_tasks.items():
        for r in loop_counts:
            if length == train_length:  # the rows above
                res = next(row for row in rows if row["mode"] == "fixed" and row["loops"] == r)
            else:
                res = evaluate_task(lm, length_task, n, batch_size, r)
            cells.append({"length": length, "loops": r, "nll": res["nll"],
                          "exact_match_sequence": res["exact_match_sequence"],
                          "exact_match_position": res["exact_match_position"]})
    return rows, {"train_length": train_length, "lengths": list(grid_tasks), "loops": list(loop_counts), "cells": cells}


