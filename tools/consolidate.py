"""Merge a training checkpoint (any TP x PP x DP layout, ZeRO 0-3) into one plain state-dict file.

    python tools/consolidate.py runs/demo_cpu runs/demo_cpu/model.safetensors [--step N]

The checkpoint is a run folder, its checkpoints/ root or one step_NNNNNNNN/ tag (without --step:
`latest`, else the newest complete one); its files are first checked against the checksums recorded when it was
saved (--no-verify-checksums skips that; a damaged file is refused naming it). The output holds the LoopedLM state
dict and the run config: safetensors (config in its metadata) for a .safetensors name, else a torch.save'd
{"model", "config"} dict (read back with weights_only=True). This is the plain format
megaloop.checkpoint.load_model, tools/generate.py, tools/eval_loops.py and tools/export_hf.py read. Without an
output path, only the tensor count is printed. The output is
written under a temporary name and renamed when complete. Errors are one line on stderr and exit code 2
(--debug or MEGALOOP_DEBUG=1 adds the traceback).
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def _main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="run folder, checkpoints/ root or step_NNNNNNNN/ tag")
    p.add_argument("output", nargs="?", default=None, help="the file to write (.safetensors, or .pt)")
    p.add_argument("--step", type=int, default=None)
    p.add_argument("--no-verify-checksums", action="store_true", help="skip checking the checkpoint files against the checksums recorded when it was saved (huge checkpoints on trusted storage)")
    args = p.parse_args(argv)

    from megaloop import checkpoint as ckpt

    sd, cfg = ckpt.load(args.checkpoint, args.step, verify=not args.no_verify_checksums)
    print(f"{len(sd)} tensors, {sum(t.numel() for t in sd.values()):,} values")
    if args.output:
        ckpt.save_plain(sd, cfg, args.output)
        print(f"wrote {args.output}")
    return 0


def main(argv=None) -> int:
    """The tool: 0, or 2 after one line on stderr for an error the user can fix (megaloop.errors.run_cli)."""
    from megaloop.errors import run_cli

    return run_cli(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
