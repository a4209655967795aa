"""Validation perplexity as a function of test-time loops, and of the exit strategies.

    python tools/eval_loops.py --model runs/demo --data data/demo_text_document --out-dir evals/demo
    python tools/eval_loops.py --model exports/demo --text val.txt --loops 1-12 --exits kl:1e-3 q_exit:0.5

--model: a checkpoint (a training run / DeepSpeed checkpoint dir, any layout, or a plain model.pt; --step
picks one) or an exported HF folder. Data: --data, a megaloop indexed dataset prefix (the
validation documents of --split are used, as training splits them), or --text, a raw UTF-8 file.
Token windows of --seq-len (+1 for the labels), non-overlapping, at most --max-windows.
Writes a table to stdout, OUT/eval_loops.csv and OUT/eval_loops.png (if matplotlib is installed).
--loops defaults to 1 .. 2x the trained loop count; each exit (strategy:threshold) is evaluated at the
largest loop count and reports the average number of loops used.
An indexed dataset made with another tokenizer than the model's is refused in one line: by its
{prefix}.tokenizer.json (written by tools/preprocess_data.py), and by token ids outside the model's
vocabulary (datasets without that file, e.g. from Megatron-LM).
A checkpoint's relative tokenizer path (data.tokenizer_model) is looked up from the current folder, then
under the run folder and its parents; --tokenizer-model names the file directly.
Errors are one line on stderr and exit code 2 (--debug or MEGALOOP_DEBUG=1 adds the traceback).

Task runs (data.task, megaloop.tasks): with neither --data nor --text, a checkpoint trained on a task is
scored on that task's examples (--task / --task-params / --task-seed choose another; the default seed is
train.seed + 1, the trainer's validation stream), --num-examples of them: exact-match accuracy per sequence
and per answer position (megaloop.tasks.exact_match_counts, the code of the trainer's validation) next to
the loss (mean NLL per answer position), at each --loops R and for each --exits item. For a task with a
length parameter (parity, prefix_sum, the group word problems) it adds a length-extrapolation grid:
--lengths (default n, 2n, 4n for the trained length n) x --loops. Lengths beyond the model's
max_seq_len are evaluated (RoPE is computed for any position; megaloop's length guard is raised for the
evaluation only). Writes OUT/eval_loops.csv (the text columns plus the accuracies), OUT/eval_lengths.csv,
OUT/eval_loops.png (accuracy vs loops, one line per length).

    python tools/eval_loops.py --model runs/parity --loops 1-16 --lengths 32,64,128 --json parity.json

--json PATH (both modes) writes the table as JSON: {"model", "kind", "train_loops", "rows": [...]} plus, for
tasks, "task", "task_params", "task_seed", "num_examples" and "length_grid" ({"train_length", "lengths",
"loops", "cells": [...]}, null for tasks without a length).
"""
import argparse
import csv
import dataclasses
import json
import math
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from megaloop.errors import UsageError  # noqa: E402


def load_model_for_cli(model, step=None, tokenizer_model=None):
    """megaloop.generation.load_lm for the tools: an exported folder as it is; for a checkpoint, its
    tokenizer model file found with megaloop.data.tokenizer.resolve_tokenizer_model (--tokenizer-model, or
    the run's relative path from here, the run folder or its parents) before the weights are read."""
    from megaloop.generation import _is_hf_folder, load_lm, wrap_megaloop

    path = Path(model)
    if path.is_dir() and _is_hf_folder(path):
        if tokenizer_model:
            raise UsageError(f"--tokenizer-model: {model} is an exported folder, which carries its own tokenizer; "
                             f"drop --tokenizer-model")
        return load_lm(model, step)
    from megaloop.checkpoint import is_deepspeed_checkpoint, load_config, load_model
    from megaloop.data.tokenizer import build_tokenizer

    # A training checkpoint's config is one small file: find the tokenizer before reading the weights. A
    # plain file holds both, so it is read once.
    lm_model, cfg = (None, load_config(path, step)) if is_deepspeed_checkpoint(path) else load_model(path, step)
    tok_path = checkpoint_tokenizer_model(model, cfg.data, tokenizer_model)
    tokenizer = build_tokenizer(cfg.data.tokenizer_type, tok_path, eod_token=cfg.data.tokenizer_eod)
    if lm_model is None:
        lm_model, _ = load_model(path, step)
    return wrap_megaloop(lm_model, tokenizer)


def checkpoint_tokenizer_model(model, data_cfg, tokenizer_model=None):
    """The tokenizer model file of a checkpoint's run (None for the byte tokenizer), resolved for this cwd."""
    from megaloop.data.tokenizer import normalize_tokenizer_type, resolve_tokenizer_model

    kind = normalize_tokenizer_type(data_cfg.tokenizer_type)
    if kind == "byte":
        if tokenizer_model:
            raise UsageError(f"--tokenizer-model: {model} was trained with the byte tokenizer, which has no model "
                             f"file; drop --tokenizer-model")
        return None
    return resolve_tokenizer_model(data_cfg.tokenizer_model, [model], tokenizer_model)


def model_tokenizer_reference(model, step=None, tokenizer_model=None):
    """The tokenizer a model was trained with, as megaloop.data.dataset_tokenizer takes it: for an exported
    folder its tokenizer files ({"type", "model"}), for a checkpoint the run's data.tokenizer_type /
    tokenizer_model (resolved as load_model_for_cli does). None when the model does not say."""
    import json

    from megaloop.generation import _is_hf_folder

    path = Path(model)
    if path.is_dir() and _is_hf_folder(path):
        tok_cfg = path / "tokenizer_config.json"
        if (path / "tokenizer.json").is_file():
            return {"type": "hf", "model": str(path / "tokenizer.json")}
        if not tok_cfg.is_file():
            return None
        cls = json.loads(tok_cfg.read_text()).get("tokenizer_class", "")
        if cls == "MegaloopByteTokenizer":
            return {"type": "byte", "model": None}
        if cls == "MegaloopSentencePieceTokenizer":
            return {"type": "sentencepiece", "model": str(path / "tokenizer.model")}
        return None
    from megaloop.checkpoint import load_config

    data_cfg = load_config(path, step).data
    return {"type": data_cfg.tokenizer_type, "model": checkpoint_tokenizer_model(model, data_cfg, tokenizer_model),
            "eod": data_cfg.tokenizer_eod}


def load_eval_tokens(lm, data=None, text=None, split="969,30,1", max_tokens=1 << 20, tokenizer_ref=None):
    """The one place that reads evaluation data: a 1-D int64 numpy array of token ids. An indexed dataset
    must fit the model: a tokenizer record ({data}.tokenizer.json) naming another tokenizer than
    `tokenizer_ref`, or a token id outside the model's vocabulary, raises DatasetTokenizerError."""
    import numpy as np

    if (data is None) == (text is None):
        raise UsageError("give exactly one of --data (indexed dataset prefix) or --text (raw text file)")
    if text is not None:
        try:
            raw = Path(text).read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise UsageError(f"--text {text}: not UTF-8 text (byte {e.start}); give a UTF-8 file") from None
        ids = lm.encode(raw)
        return np.asarray(ids[:max_tokens], dtype=np.int64)
    from megaloop.data.dataset_tokenizer import check_dataset_tokenizer, check_token_ids
    from megaloop.data.gpt_dataset import parse_split
    from megaloop.data.indexed_dataset import IndexedDataset

    if tokenizer_ref is not None:
        check_dataset_tokenizer(data, tokenizer_ref)
    ds = IndexedDataset(data)
    start, end = parse_split(split, ds.num_documents)[1]  # the validation range
    if start == end:
        print(f"note: split {split!r} leaves no validation documents in {data}; using all documents",
              file=sys.stderr)
        start, end = 0, ds.num_documents
    chunks, total = [], 0
    for d in range(start, end):
        doc = np.asarray(ds.get_document(d), dtype=np.int64)
        chunks.append(doc)
        total += doc.size
        if total >= max_tokens:
            break
    tokens = np.concatenate(chunks)[:max_tokens] if chunks else np.zeros(0, dtype=np.int64)
    if lm.vocab_size:
        check_token_ids(tokens, lm.vocab_size, f"dataset {data}")
    return tokens


def windows(tokens, seq_len, max_windows, batch_size, source="the evaluation data"):
    import torch

    n = min(max_windows, (len(tokens) - 1) // seq_len)
    if n < 1:
        raise UsageError(f"{source} holds only {len(tokens)} tokens, not enough for one window of --seq-len "
                         f"{seq_len} + 1: lower --seq-len, or give more text / validation documents (--split)")
    t = torch.as_tensor(tokens[: n * seq_len + 1])
    x = torch.stack([t[i * seq_len: (i + 1) * seq_len] for i in range(n)])
    y = torch.stack([t[i * seq_len + 1: (i + 1) * seq_len + 1] for i in range(n)])
    return list(zip(x.split(batch_size), y.split(batch_size)))


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


# ------------------------------------------------------------------------------------------------
# Tasks (data.task)


def run_config(model, step=None):
    """The run config of a checkpoint (megaloop.checkpoint.load_config); None for an exported folder."""
    from megaloop.generation import _is_hf_folder

    path = Path(model)
    if path.is_dir() and _is_hf_folder(path):
        return None
    from megaloop.checkpoint import load_config

    return load_config(path, step)


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


def task_tables(lm, spec, args, loop_counts, exits):
    """(rows at the task's own parameters: fixed loops then exits, the length grid or None)."""
    name, params, seed = spec
    task = make_task(name, params, seed)
    if "length" not in task.params() and args.lengths is not None:
        raise UsageError(f"--lengths: task {name!r} has no length parameter (it takes {sorted(task.params())})")
    if lm.vocab_size and task.vocab_size > lm.vocab_size:
        raise UsageError(f"task {name!r} {params} uses {task.vocab_size} token ids but the model has {lm.vocab_size}")
    n = args.num_examples
    grid_tasks = None
    if "length" in task.params():
        lengths = parse_lengths(args.lengths, task.params()["length"])
        grid_tasks = {length: make_task(name, params, seed, length=length) for length in lengths}
        fit_length(lm, max(t.seq_len for t in grid_tasks.values()))  # (refused before any work if it cannot)
    rows = []
    for r in loop_counts:
        rows.append({"mode": "fixed", "threshold": "", "loops": r,
                     **evaluate_task(lm, task, n, args.batch_size, r)})
    r_max = max(loop_counts)
    for item, (strategy, thr, threshold) in zip(args.exits or [], exits):
        if strategy == "q_exit" and not lm.has_exit_gate:
            print(f"skipping {item}: the model has no exit gate", file=sys.stderr)
            continue
        rows.append({"mode": strategy, "threshold": thr, "loops": r_max,
                     **evaluate_task(lm, task, n, args.batch_size, r_max, strategy, threshold)})
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
                res = evaluate_task(lm, length_task, n, args.batch_size, r)
            cells.append({"length": length, "loops": r, "nll": res["nll"],
                          "exact_match_sequence": res["exact_match_sequence"],
                          "exact_match_position": res["exact_match_position"]})
    return rows, {"train_length": train_length, "lengths": list(grid_tasks), "loops": list(loop_counts), "cells": cells}


def print_task_tables(lm, spec, args, rows, grid):
    name, params, seed = spec
    print(f"{lm.kind} model trained with R={lm.train_loops}; task {name} {params}, {args.num_examples} examples "
          f"(seed {seed}); exact match per sequence (seq_acc) and per answer position (pos_acc)")
    print(f"{'mode':>8} {'threshold':>9} {'loops':>5} {'avg_loops':>9} {'nll':>8} {'seq_acc':>8} {'pos_acc':>8}")
    for row in rows:
        print(f"{row['mode']:>8} {row['threshold']:>9} {row['loops']:>5} {row['avg_loops']:>9.2f} "
              f"{row['nll']:>8.4f} {row['exact_match_sequence']:>8.3f} {row['exact_match_position']:>8.3f}")
    if grid is None:
        return
    print(f"length extrapolation (trained at length {grid['train_length']}): seq_acc / pos_acc")
    print(f"{'length':>6} " + " ".join(f"{'R=' + str(r):>13}" for r in grid["loops"]))
    for length in grid["lengths"]:
        cells = [c for c in grid["cells"] if c["length"] == length]
        print(f"{length:>6} " + " ".join(f"{c['exact_match_sequence']:>6.3f}/{c['exact_match_position']:.3f}"
                                         for c in cells))


def write_task_outputs(out, rows, grid, train_loops):
    with open(out / "eval_loops.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["mode", "threshold", "loops", "avg_loops", "nll", "ppl",
                                          "exact_match_sequence", "exact_match_position"])
        w.writeheader()
        w.writerows(rows)
    print(f"wrote {out / 'eval_loops.csv'}")
    if grid is not None:
        with open(out / "eval_lengths.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["length", "loops", "nll", "exact_match_sequence",
                                              "exact_match_position"])
            w.writeheader()
            w.writerows(grid["cells"])
        print(f"wrote {out / 'eval_lengths.csv'}")
    plt = _pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    fixed = [r for r in rows if r["mode"] == "fixed"]
    if grid is None:
        ax.plot([r["loops"] for r in fixed], [r["exact_match_sequence"] for r in fixed], "o-", label="fixed loops")
    else:
        for length in grid["lengths"]:
            cells = [c for c in grid["cells"] if c["length"] == length]
            ax.plot([c["loops"] for c in cells], [c["exact_match_sequence"] for c in cells], "o-",
                    label=f"length {length}" + (" (trained)" if length == grid["train_length"] else ""))
    for r in rows:
        if r["mode"] != "fixed":
            ax.plot([r["avg_loops"]], [r["exact_match_sequence"]], "s", label=f"{r['mode']} {r['threshold']} (avg loops)")
    ax.axvline(train_loops, color="gray", ls="--", lw=1, label="trained R")
    ax.set_xlabel("loops at test time")
    ax.set_ylabel("exact match (per sequence)")
    ax.set_ylim(-0.02, 1.02)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "eval_loops.png", dpi=120)
    print(f"wrote {out / 'eval_loops.png'}")


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: skipping the PNG plot (pip install matplotlib to get it)")
        return None
    return plt


def write_json(path, payload):
    path = Path(path)
    if path.parent != Path(""):
        path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1) + "\n")
    print(f"wrote {path}")


EXIT_STRATEGIES = ("kl", "q_exit")


def parse_exit(item):
    """'kl:1e-3' -> ("kl", "1e-3", 0.001); ValueError naming --exits otherwise."""
    strategy, _, thr = item.partition(":")
    if strategy not in EXIT_STRATEGIES:
        raise UsageError(f"--exits {item!r}: unknown strategy {strategy!r}; use one of {', '.join(EXIT_STRATEGIES)} "
                         f"as strategy:threshold, e.g. kl:1e-3")
    try:
        threshold = float(thr) if thr else None
    except ValueError:
        raise UsageError(f"--exits {item!r}: the threshold {thr!r} is not a number; e.g. {strategy}:1e-3") from None
    return strategy, thr, threshold


def _main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--step", type=int, default=None)
    p.add_argument("--data", default=None, help="indexed dataset path prefix (without .bin/.idx)")
    p.add_argument("--text", default=None, help="raw text file")
    p.add_argument("--split", default="969,30,1")
    p.add_argument("--seq-len", type=int, default=None, help="default: the model's max_seq_len")
    p.add_argument("--max-windows", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--loops", default=None, help="e.g. 1-8 or 1,2,4,8 (default 1 .. 2x trained)")
    p.add_argument("--exits", nargs="*", default=["kl:1e-3"],
                   help="strategy:threshold items, e.g. kl:1e-3 q_exit:0.5 (q_exit only with an exit gate)")
    p.add_argument("--out-dir", default="eval_loops_out")
    p.add_argument("--tokenizer-model", default=None,
                   help="the tokenizer model file (sentencepiece .model, tokenizer.json or its folder, .tiktoken), "
                        "when the run's recorded (relative) path does not resolve")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    p.add_argument("--task", default=None, help="score a synthetic task (default: the run's data.task when "
                   "neither --data nor --text is given)")
    p.add_argument("--task-params", default=None, help="the task's parameters as JSON (default: the run's)")
    p.add_argument("--task-seed", type=int, default=None, help="default: train.seed + 1 (the validation stream)")
    p.add_argument("--num-examples", type=int, default=256, help="task examples scored per cell")
    p.add_argument("--lengths", default=None, help="task lengths of the extrapolation grid, e.g. 16,32,64 "
                   "(default n, 2n, 4n; tasks with a length parameter)")
    args = p.parse_args(argv)
    if args.seq_len is not None and args.seq_len < 1:
        raise UsageError(f"--seq-len {args.seq_len}: must be at least 1")
    if args.max_windows < 1 or args.batch_size < 1:
        raise UsageError("--max-windows and --batch-size must be at least 1")
    if args.num_examples < 1:
        raise UsageError(f"--num-examples {args.num_examples}: must be at least 1")
    if args.loops is not None:
        parse_loops(args.loops, 1)  # a bad --loops fails before the model is read
    if args.lengths is not None:
        parse_lengths(args.lengths, 1)
    exits = [parse_exit(item) for item in args.exits or []]
    text_mode = args.data is not None or args.text is not None
    if args.task is not None and text_mode:
        raise UsageError("--task scores a synthetic task: drop --data / --text (or --task)")
    cfg = None if text_mode else run_config(args.model, args.step)
    spec = None if text_mode else task_spec(cfg, args.task, args.task_params, args.task_seed)

    lm = load_model_for_cli(args.model, args.step, args.tokenizer_model)
    if spec is not None:
        return _main_task(args, lm, spec, exits)
    from megaloop.generation import is_causal

    if not is_causal(lm):
        raise UsageError(f"{args.model} was trained with model.causal=false (bidirectional attention): every position "
                         f"sees its next-token target, so --data / --text perplexity means nothing; score its task "
                         f"(drop --data / --text, or give --task)")
    seq_len = min(args.seq_len or lm.max_seq_len, lm.max_seq_len)
    ref = model_tokenizer_reference(args.model, args.step, args.tokenizer_model) if args.data is not None else None
    tokens = load_eval_tokens(lm, args.data, args.text, args.split, max_tokens=args.max_windows * seq_len + 1,
                              tokenizer_ref=ref)
    batches = windows(tokens, seq_len, args.max_windows, args.batch_size,
                      f"--data {args.data}" if args.data is not None else f"--text {args.text}")
    loop_counts = parse_loops(args.loops, lm.train_loops)
    rows = []
    for r in loop_counts:
        nll, used = evaluate(lm, batches, r)
        rows.append({"mode": "fixed", "threshold": "", "loops": r, "avg_loops": used, "nll": nll,
                     "ppl": math.exp(nll)})
    r_max = max(loop_counts)
    for item, (strategy, thr, threshold) in zip(args.exits or [], exits):
        if strategy == "q_exit" and not lm.has_exit_gate:
            print(f"skipping {item}: the model has no exit gate", file=sys.stderr)
            continue
        nll, used = evaluate(lm, batches, r_max, strategy, threshold)
        rows.append({"mode": strategy, "threshold": thr, "loops": r_max, "avg_loops": used, "nll": nll,
                     "ppl": math.exp(nll)})

    n_tok = sum(y.numel() for _, y in batches)
    print(f"{lm.kind} model trained with R={lm.train_loops}; {n_tok} tokens in {len(batches)} batches")
    print(f"{'mode':>8} {'threshold':>9} {'loops':>5} {'avg_loops':>9} {'nll':>8} {'ppl':>10}")
    for row in rows:
        print(f"{row['mode']:>8} {row['threshold']:>9} {row['loops']:>5} {row['avg_loops']:>9.2f} "
              f"{row['nll']:>8.4f} {row['ppl']:>10.3f}")
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)  # an OSError here is one line naming the folder (run_cli)
    with open(out / "eval_loops.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["mode", "threshold", "loops", "avg_loops", "nll", "ppl"])
        w.writeheader()
        w.writerows(rows)
    print(f"wrote {out / 'eval_loops.csv'}")
    if args.json:
        write_json(args.json, {"model": str(args.model), "kind": lm.kind, "train_loops": lm.train_loops,
                               "tokens": n_tok, "rows": rows})
    plt = _pyplot()
    if plt is None:
        return 0
    fig, ax = plt.subplots(figsize=(6, 4))
    fixed = [r for r in rows if r["mode"] == "fixed"]
    ax.plot([r["loops"] for r in fixed], [r["ppl"] for r in fixed], "o-", label="fixed loops")
    for r in rows:
        if r["mode"] != "fixed":
            ax.plot([r["avg_loops"]], [r["ppl"]], "s", label=f"{r['mode']} {r['threshold']} (avg loops)")
    ax.axvline(lm.train_loops, color="gray", ls="--", lw=1, label="trained R")
    ax.set_xlabel("loops at test time")
    ax.set_ylabel("validation perplexity")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "eval_loops.png", dpi=120)
    print(f"wrote {out / 'eval_loops.png'}")
    return 0


def _main_task(args, lm, spec, exits):
    loop_counts = parse_loops(args.loops, lm.train_loops)
    rows, grid = task_tables(lm, spec, args, loop_counts, exits)
    print_task_tables(lm, spec, args, rows, grid)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if args.json:
        name, params, seed = spec
        write_json(args.json, {"model": str(args.model), "kind": lm.kind, "train_loops": lm.train_loops,
                               "task": name, "task_params": params, "task_seed": seed,
                               "num_examples": args.num_examples, "rows": rows, "length_grid": grid})
    write_task_outputs(out, rows, grid, lm.train_loops)
    return 0


def main(argv=None) -> int:
    """The tool: 0, or 2 after one line on stderr for an error the user can fix (megaloop.errors.run_cli)."""
    from megaloop.errors import run_cli

    return run_cli(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
