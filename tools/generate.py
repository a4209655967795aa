"""Sample from a megaloop checkpoint or an exported Hugging Face folder with a chosen number of loops.

    python tools/generate.py --model runs/demo --prompt "The " --loops 6 \
        --temperature 0.8 --top-p 0.95 --max-new-tokens 128
    python tools/generate.py --model exports/demo --prompt "The " --exit kl --exit-threshold 1e-3

--model is a checkpoint: a training run directory / DeepSpeed checkpoint of any TP x PP layout and ZeRO
stage, or a plain model.pt (read through megaloop.checkpoint.load_model; --step picks one), or a folder
written by tools/export_hf.py (uses its KV cache). --temperature 0 is greedy.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def main(argv=None):
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
    args = p.parse_args(argv)

    import torch

    from megaloop.checkpoint import CheckpointError
    from megaloop.export import ExportError
    from megaloop.generation import generate, load_lm

    try:
        lm = load_lm(args.model, args.step)
    except (CheckpointError, ExportError) as e:
        print(f"cannot load {args.model}: {e}", file=sys.stderr)
        return 1
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


if __name__ == "__main__":
    sys.exit(main())
