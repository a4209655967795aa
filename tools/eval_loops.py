"""Validation perplexity as a function of test-time loops, and of the exit strategies.

    python tools/eval_loops.py --model runs/demo --data data/demo_text_document --out-dir evals/demo
    python tools/eval_loops.py --model exports/demo --text val.txt --loops 1-12 --exits kl:1e-3 q_exit:0.5

--model: a checkpoint (a training run / DeepSpeed checkpoint dir, any layout, or a plain model.pt; --step
picks one) or an exported HF folder. Data: --data, a megaloop indexed dataset prefix (the
validation documents of --split are used, as training splits them; for a run's own dataset --split defaults
to the run's data.split, else to 969,30,1), or --text, a raw UTF-8 file.
Token windows of --seq-len (+1 for the labels; at most the model's max_seq_len), non-overlapping, at most
--max-windows. A loop count above --max-loops (default 256) is refused.
Writes a table to stdout, OUT/eval_loops.csv and OUT/eval_loops.png (if matplotlib is installed).
--loops defaults to 1 .. 2x the trained loop count; each exit (strategy:threshold) is evaluated at the
largest loop count and reports the average number of loops used.
An indexed dataset made with another tokenizer than the model's is refused in one line: by its
{prefix}.tokenizer.json (written by tools/preprocess_data.py), and by token ids outside the model's
vocabulary (datasets without that file, e.g. from Megatron-LM).
A checkpoint's relative tokenizer path (data.tokenizer_model) is looked up from the current folder, then
under the run folder and its parents; --tokenizer-model names the file directly.
Errors are one line on stderr and exit code 2 (--debug or MEGALOOP_DEBUG=1 adds the traceback).
The computation is megaloop/evaluation/ (inputs.py, loops.py, report.py); this file is its command line.

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
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from megaloop.cli_checks import add_max_loops_flag, check_loops, check_seq_len  # noqa: E402
from megaloop.errors import UsageError  # noqa: E402
from megaloop.evaluation.inputs import eval_split, load_eval_tokens, load_model_for_cli, \
    model_tokenizer_reference, run_config, windows  # noqa: E402
from megaloop.evaluation.loops import parse_exit, parse_lengths, parse_loops, task_spec, task_tables, \
    text_rows  # noqa: E402
from megaloop.evaluation.report import TEXT_COLUMNS, plot_text, print_task_tables, print_text_table, write_csv, \
    write_json, write_task_outputs  # noqa: E402


def _main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--step", type=int, default=None)
    p.add_argument("--data", default=None, help="indexed dataset path prefix (without .bin/.idx)")
    p.add_argument("--text", default=None, help="raw text file")
    p.add_argument("--split", default=None, help="train,valid,test weights; --data's validation documents are "
                   "evaluated (default: the run's data.split when --data is the run's own dataset, else 969,30,1)")
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
    p.add_argument("--no-verify-checksums", action="store_true",
                   help="skip checking the checkpoint files against the checksums recorded when it was "
                   "saved (huge checkpoints on trusted storage)")
    add_max_loops_flag(p)
    args = p.parse_args(argv)
    if args.seq_len is not None and args.seq_len < 1:
        raise UsageError(f"--seq-len {args.seq_len}: must be at least 1")
    if args.max_windows < 1 or args.batch_size < 1:
        raise UsageError("--max-windows and --batch-size must be at least 1")
    if args.num_examples < 1:
        raise UsageError(f"--num-examples {args.num_examples}: must be at least 1")
    if args.loops is not None:
        check_loops(f"--loops {args.loops}", parse_loops(args.loops, 1), args.max_loops)  # before the model is read
    if args.lengths is not None:
        parse_lengths(args.lengths, 1)
    exits = [parse_exit(item) for item in args.exits or []]
    text_mode = args.data is not None or args.text is not None
    if args.task is not None and text_mode:
        raise UsageError("--task scores a synthetic task: drop --data / --text (or --task)")
    cfg = None if text_mode else run_config(args.model, args.step)
    spec = None if text_mode else task_spec(cfg, args.task, args.task_params, args.task_seed)

    lm = load_model_for_cli(args.model, args.step, args.tokenizer_model, verify=not args.no_verify_checksums)
    if spec is not None:
        return _main_task(args, lm, spec, exits)
    from megaloop.generation import is_causal

    if not is_causal(lm):
        raise UsageError(f"{args.model} was trained with model.causal=false (bidirectional attention): every position "
                         f"sees its next-token target, so --data / --text perplexity means nothing; score its task "
                         f"(drop --data / --text, or give --task)")
    seq_len = check_seq_len(args.seq_len, lm.max_seq_len, args.model)
    ref = model_tokenizer_reference(args.model, args.step, args.tokenizer_model) if args.data is not None else None
    split = eval_split(args.model, args.step, args.data, args.split)
    tokens = load_eval_tokens(lm, args.data, args.text, split, max_tokens=args.max_windows * seq_len + 1,
                              tokenizer_ref=ref)
    batches = windows(tokens, seq_len, args.max_windows, args.batch_size,
                      f"--data {args.data}" if args.data is not None else f"--text {args.text}")
    loop_counts = parse_loops(args.loops, lm.train_loops)
    rows = text_rows(lm, batches, loop_counts, list(zip(args.exits or [], exits)))
    print_text_table(lm, rows, sum(y.numel() for _, y in batches), len(batches))
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)  # an OSError here is one line naming the folder (run_cli)
    write_csv(out / "eval_loops.csv", TEXT_COLUMNS, rows)
    if args.json:
        write_json(args.json, {"model": str(args.model), "kind": lm.kind, "train_loops": lm.train_loops,
                               "tokens": sum(y.numel() for _, y in batches), "rows": rows})
    plot_text(out, rows, lm.train_loops)
    return 0


def _main_task(args, lm, spec, exits):
    loop_counts = parse_loops(args.loops, lm.train_loops)
    rows, grid = task_tables(lm, spec, loop_counts, list(zip(args.exits or [], exits)), args.num_examples,
                             args.batch_size, args.lengths)
    print_task_tables(lm, spec, args.num_examples, rows, grid)
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
