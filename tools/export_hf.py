"""Export a megaloop checkpoint to a Hugging Face folder (config.json with auto_map, self-contained
configuration/modeling/tokenization files, model.safetensors, tokenizer, generation_config.json).

    python tools/export_hf.py --checkpoint runs/demo --output exports/demo [--step N]
    python tools/export_hf.py --checkpoint runs/demo/checkpoints/step_00000500 --output exports/demo500
    python tools/export_hf.py --checkpoint runs/demo --output exports/demo-llama --format llama --loops 4
    python -c "from transformers import AutoModelForCausalLM as M; \
               M.from_pretrained('exports/demo', trust_remote_code=True)"

--checkpoint is a training run (its output_dir, its checkpoints/ root or one step_NNNNNNNN/ tag) of
any TP x PP x DP layout and ZeRO stage, or a plain torch.save'd state dict; it is read through
megaloop.checkpoint: the shards are merged into the one-process LoopedLM names, and the resolved
config and tokenizer reference stored with the checkpoint are used. Without --step the
checkpoint named by `latest` (or the newest complete one) is exported. An incomplete checkpoint (no
megaloop_complete.json), a missing shard file, a file that does not match the checksum recorded when it
was saved (--no-verify-checksums skips that check) or a shard of the wrong shape fails with a message
naming the file, and nothing is written.

--output may not be the checkpoint being read, contain it, or lie inside its checkpoints/ tree (symlinks
are resolved); `--output runs/demo/hf` beside a run's checkpoints is fine. --overwrite replaces only a
folder that holds a previous export (its config.json and the files an export writes, nothing else) or an
empty one; any other folder is refused in one line and nothing is deleted. Errors are one line on stderr
and exit code 2 (--debug or MEGALOOP_DEBUG=1 adds the traceback).
"""
import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def _main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="checkpoint file or directory")
    p.add_argument("--output", required=True,
                   help="folder to write: must not exist unless --overwrite, and may not be the checkpoint, contain "
                        "it or lie inside its checkpoints/ tree (runs/X/hf beside a run's checkpoints is fine)")
    p.add_argument("--step", type=int, default=None)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--overwrite", action="store_true",
                   help="replace --output if it holds a previous export (only then: any other folder is refused)")
    p.add_argument("--noise-init", default="seeded", choices=["seeded", "global_rng", "zeros"],
                   help="how the exported model draws a `noise` initial state (see README in the folder)")
    p.add_argument("--noise-seed", type=int, default=0)
    p.add_argument("--tokenizer-model", default=None,
                   help="override the run's tokenizer model path (.model, tokenizer.json or its folder, .tiktoken)")
    p.add_argument("--no-verify", action="store_true", help="skip the logits check against megaloop")
    p.add_argument("--no-verify-checksums", action="store_true",
                   help="skip checking the checkpoint files against the checksums recorded when it was "
                   "saved (huge checkpoints on trusted storage)")
    p.add_argument("--format", choices=["megaloop", "llama"], default="megaloop",
                   help="megaloop: remote-code folder (every architecture); llama: unrolled LlamaForCausalLM, "
                        "no remote code, fixed --loops, only for plain loops of standard layers")
    p.add_argument("--loops", type=int, default=None, help="--format llama: loops to unroll (default: trained R)")
    args = p.parse_args(argv)

    from megaloop import checkpoint as ckpt
    from megaloop.export import ExportError, export_hf, load_checkpoint

    if args.loops is not None and args.loops < 1:
        raise ExportError(f"--loops {args.loops}: the loop count to unroll must be at least 1")
    try:
        from megaloop.export.output_dir import check_export_paths, check_output_dir

        # Before reading anything: the output may not be (or contain, or lie in the checkpoint tree of)
        # the checkpoint, and --overwrite replaces only a previous export.
        check_export_paths(args.checkpoint, args.output)
        check_output_dir(Path(args.output).resolve(), args.overwrite)

        if ckpt.is_deepspeed_checkpoint(args.checkpoint):
            print(f"reading {ckpt.resolve(args.checkpoint, args.step)}", file=sys.stderr)
        state_dict, cfg, data_cfg = load_checkpoint(args.checkpoint, args.step, verify=not args.no_verify_checksums)
        from megaloop.evaluation.inputs import checkpoint_tokenizer_model

        tok = {"type": data_cfg.tokenizer_type, "eod": getattr(data_cfg, "tokenizer_eod", None),
               "model": checkpoint_tokenizer_model(args.checkpoint, data_cfg, args.tokenizer_model)}
        if args.format == "llama":
            from megaloop.export.llama_export import export_llama

            out = export_llama(state_dict, cfg, tok, args.output, loops=args.loops, dtype=args.dtype,
                               overwrite=args.overwrite)
        else:
            out = export_hf(state_dict, cfg, tok, args.output, dtype=args.dtype, overwrite=args.overwrite,
                            noise_init=args.noise_init, noise_seed=args.noise_seed, verify=not args.no_verify)
    except NotImplementedError as e:
        raise ExportError(f"cannot export {args.checkpoint}: {e}") from e
    print(f"exported to {out}")
    return 0


def main(argv=None) -> int:
    """The tool: 0, or 2 after one line on stderr for an error the user can fix (megaloop.errors.run_cli)."""
    from megaloop.errors import run_cli

    return run_cli(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
