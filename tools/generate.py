"""Sample from a megaloop checkpoint or an exported Hugging Face folder with a chosen number of loops.

    python tools/generate.py --model runs/demo --prompt "The " --loops 6 \
        --temperature 0.8 --top-p 0.95 --max-new-tokens 128
    python tools/generate.py --model exports/demo --prompt "The " --exit kl --exit-threshold 1e-3

--model is a checkpoint: a training run directory / DeepSpeed checkpoint of any TP x PP layout and ZeRO
stage, or a plain model.pt (read through megaloop.checkpoint.load_model; --step picks one), or a folder
written by tools/export_hf.py (uses its KV cache). --temperature 0 is greedy. A checkpoint's relative
tokenizer path (data.tokenizer_model) is looked up from the current folder, then under the run folder and
its parents; --tokenizer-model names the file directly. Errors are one line on stderr and exit code 2
(--debug or MEGALOOP_DEBUG=1 adds the traceback).
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from megaloop.cli_checks import add_max_loops_flag, check_finite, check_loops, check_temperature  # noqa: E402
from megaloop.errors import UsageError  # noqa: E402


def _main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="checkpoint file/dir, or an exported HF folder")
    p.add_argument("--step", type=int, default=None)
    p.add_argument("--prompt", default="The ")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--loops", type=int, default=None, help="test-time loop count (default: the trained R)")
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument("--exit", choices=["q_exit", "kl"], default=None)
    p.add_argument("--exit-threshold", type=float, default=None)
    p.add_argument("--tokenizer-model", default=None,
                   help="the tokenizer model file (sentencepiece .model, tokenizer.json or its folder, .tiktoken), "
                        "when the run's recorded (relative) path does not resolve")
    add_max_loops_flag(p)
    args = p.parse_args(argv)
    if args.loops is not None and args.loops < 1:
        raise UsageError(f"--loops {args.loops}: the loop count must be at least 1")
    check_loops(f"--loops {args.loops}", [args.loops or 0], args.max_loops)
    check_temperature(args.temperature)
    check_finite("--exit-threshold", args.exit_threshold)
    if args.top_k is not None and args.top_k < 1:
        raise UsageError(f"--top-k {args.top_k}: must be at least 1 (leave it out to keep every token)")
    if args.max_new_tokens < 0 or args.num_samples < 1:
        raise UsageError("--max-new-tokens must be >= 0 and --num-samples >= 1")
    if not 0 < args.top_p <= 1:
        raise UsageError(f"--top-p {args.top_p}: must be in (0, 1]")

    import torch

    from megaloop.generation import generate
    from megaloop.evaluation.inputs import load_model_for_cli

    lm = load_model_for_cli(args.model, args.step, args.tokenizer_model)
    if args.exit == "q_exit" and not lm.has_exit_gate:
        raise UsageError(f"--exit q_exit: {args.model} has no exit gate (model.exit_gate); use --exit kl")
    prompt = lm.encode(args.prompt)
    if not prompt:
        p.error("the prompt encodes to no tokens")
    ids = torch.tensor([prompt] * args.num_samples)
    out = generate(lm, ids, max_new_tokens=args.max_new_tokens, loops=args.loops, temperature=args.temperature,
                   top_p=args.top_p, top_k=args.top_k, seed=args.seed, exit=args.exit,
                   exit_threshold=args.exit_threshold)
    loops = args.loops or lm.train_loops
    for i in range(args.num_samples):
        if args.num_samples > 1:
            print(f"--- sample {i + 1}")
        print(args.prompt + lm.decode(out.new_tokens[i].tolist()))
    print(f"[{lm.kind} model, R={loops}, mean loops used {out.mean_loops:.2f}, "
          f"{out.new_tokens.shape[1]} new tokens]", file=sys.stderr)
    return 0


def main(argv=None) -> int:
    """The tool: 0, or 2 after one line on stderr for an error the user can fix (megaloop.errors.run_cli)."""
    from megaloop.errors import run_cli

    return run_cli(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
