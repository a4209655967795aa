"""lm-evaluation-harness on a megaloop checkpoint at chosen test-time loop counts.

    python tools/eval_harness.py runs/demo --tasks lambada_openai,hellaswag --loops 1,4,8 --limit 200
    python tools/eval_harness.py exports/demo --tasks my_task --include-path my_tasks/ --json res.json

RUN: a training run (its output_dir, checkpoints/ root or one step_NNNNNNNN/ tag; --step picks one), a plain
checkpoint, or a folder exported by tools/export_hf.py. A checkpoint is exported to a temporary Hugging Face
folder first (deleted afterwards); lm-eval's `hf` model loads that folder, and each R of --loops is run as the
exported config's num_loops (megaloop/evaluation/harness.py). From the command line, lm-eval itself runs an
export the same way: `lm_eval --model hf --model_args pretrained=DIR,trust_remote_code=True,num_loops=4`.

--tasks: lm-eval task names, comma-separated; --include-path: a folder of your own task YAML files (a task
over a local jsonl: `dataset_path: json`, `dataset_kwargs: {data_files: {test: FILE}}`). Prints one line per
(task, R, metric) and writes --json {"model", "tasks", "loops", "rows": [{"task", "R", "metrics"}]}.
Errors are one line on stderr and exit code 2 (--debug or MEGALOOP_DEBUG=1 adds the traceback).
"""
import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from megaloop.errors import UsageError  # noqa: E402


def _main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="run folder, checkpoint or exported HF folder")
    p.add_argument("--tasks", required=True, help="lm-eval task names, comma-separated")
    p.add_argument("--loops", default=None, help="e.g. 1,4,8 or 1-4 (default: the trained R)")
    p.add_argument("--step", type=int, default=None)
    p.add_argument("--include-path", default=None, help="folder of your own lm-eval task YAML files")
    p.add_argument("--limit", type=int, default=None, help="at most this many examples per task")
    p.add_argument("--num-fewshot", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="cpu", help="torch device of the model, e.g. cuda:0")
    p.add_argument("--tokenizer-model", default=None, help="the tokenizer model file (sentencepiece .model, "
                   "tokenizer.json or its folder, .tiktoken), when the run's recorded (relative) path does not resolve")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = p.parse_args(argv)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks:
        raise UsageError("--tasks: name at least one lm-eval task, e.g. --tasks lambada_openai")
    if (args.limit is not None and args.limit < 1) or args.batch_size < 1:
        raise UsageError("--limit and --batch-size must be at least 1")

    from megaloop.evaluation.harness import run_harness, task_manager
    from megaloop.evaluation.loops import parse_loops
    from megaloop.evaluation.report import write_json
    from megaloop.generation import _is_hf_folder

    if args.loops is not None:
        parse_loops(args.loops, 1)  # a bad --loops fails before anything is read
    manager = task_manager(tasks, args.include_path)  # an unknown task fails before the export
    with tempfile.TemporaryDirectory(prefix="megaloop-harness-") as tmp:
        folder = Path(args.model)
        if not (folder.is_dir() and _is_hf_folder(folder)):
            folder = _export(args, Path(tmp) / "hf")
        from transformers import AutoConfig
        trained = int(AutoConfig.from_pretrained(str(folder), trust_remote_code=True).num_loops)
        loops = parse_loops(args.loops, trained) if args.loops is not None else [trained]
        rows = run_harness(folder, tasks, loops, args.include_path, args.limit, args.batch_size, args.num_fewshot,
                           args.device, manager)
    print(f"lm-eval on {args.model} (trained R={trained}): {', '.join(tasks)} at R = {', '.join(map(str, loops))}")
    print(f"{'task':>24} {'R':>4} {'metric':>20} {'value':>12}")
    for row in rows:
        for metric, value in row["metrics"].items():
            print(f"{row['task']:>24} {row['R']:>4} {metric:>20} {value:>12.4f}")
    if args.json:
        write_json(args.json, {"model": str(args.model), "tasks": tasks, "loops": loops, "rows": rows})
    return 0


def _export(args, out: Path) -> Path:
    """A checkpoint -> a temporary HF folder (its config, and its tokenizer found as tools/export_hf.py does)."""
    from megaloop import checkpoint as ckpt
    from megaloop.evaluation.harness import export_weights
    from megaloop.evaluation.inputs import checkpoint_tokenizer_model
    from megaloop.export import load_checkpoint

    if ckpt.is_deepspeed_checkpoint(args.model):
        print(f"reading {ckpt.resolve(args.model, args.step)}", file=sys.stderr)
    state_dict, cfg, data_cfg = load_checkpoint(args.model, args.step)
    tok = {"type": data_cfg.tokenizer_type, "eod": getattr(data_cfg, "tokenizer_eod", None),
           "model": checkpoint_tokenizer_model(args.model, data_cfg, args.tokenizer_model)}
    return export_weights(state_dict, cfg, tok, out)


def main(argv=None) -> int:
    """The tool: 0, or 2 after one line on stderr for an error the user can fix (megaloop.errors.run_cli)."""
    from megaloop.errors import run_cli

    return run_cli(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
