"""Tokenize raw text into Megatron-LM-compatible {output-prefix}_{key}_document.bin/.idx.

Flags follow Megatron-LM's tools/preprocess_data.py (GPT-NeoX's --jsonl-keys works too):

    python tools/preprocess_data.py --input 'data/*.jsonl.gz' --json-keys text \\
        --output-prefix data/corpus --tokenizer-type sentencepiece --tokenizer-model spm.model \\
        --append-eod --workers 16
    python tools/preprocess_data.py --input data/corpus.jsonl --output-prefix data/corpus --append-eod \\
        --tokenizer-type HuggingFaceTokenizer --tokenizer-model path/to/Llama-3.2-1B --workers 16

Inputs: .jsonl/.json (one JSON object per line), .txt (one document per line, or per file with
--text-documents file), each plain, gzipped (.gz) or zstandard-compressed (.zst, streamed); .parquet (read a
row group at a time, --json-keys name string columns); a folder saved by `datasets`' save_to_disk (its
memory-mapped Arrow files); any other folder stands for the readable files under it. Bad records are skipped
and reported with file and line, or file and row (from 0) for tables; --strict makes the first one an error.
--shuffle-seed S writes the documents in a seeded random order (a second pass over the written dataset), for
corpora that come sorted. Outputs appear only when complete. Each dataset gets a
small {prefix}_{key}_document.tokenizer.json recording the tokenizer (type, vocabulary size, sha256 of
the model file): megaloop's trainer and tools/eval_loops.py refuse it with a model of another tokenizer;
Megatron-LM ignores it. Errors (a missing input, a truncated .gz / .zst, a corrupt or empty parquet file, an
unknown column, nothing usable in the inputs, an unwritable or full output folder) are one line on stderr and
exit code 2, and leave no partial output; --debug or MEGALOOP_DEBUG=1 adds the traceback.
"""
import argparse
import os
import signal
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from megaloop.data.preprocess import PreprocessConfig, PreprocessError, preprocess  # noqa: E402
from megaloop.data.text_inputs import expand_inputs  # noqa: E402
from megaloop.data.tokenizer import build_tokenizer  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    group = parser.add_argument_group("input data")
    group.add_argument("--input", nargs="+", required=True,
                       help="input files or folders: paths, globs or comma-separated lists (.jsonl, .json, .txt, "
                            "each plain, .gz or .zst; .parquet; a folder saved by datasets' save_to_disk; a folder "
                            "stands for those files under it)")
    group.add_argument("--json-keys", "--jsonl-keys", dest="json_keys", nargs="+", default=["text"],
                       help="keys to extract from each json object (columns of a parquet file or datasets folder); "
                            "one output dataset per key")
    group.add_argument("--text-documents", choices=["line", "file"], default="line",
                       help=".txt inputs: one document per line (default) or per file")
    group.add_argument("--split-sentences", action="store_true", help="not supported (documents are kept whole)")
    group.add_argument("--keep-newlines", action="store_true",
                       help="accepted for compatibility: newlines are always kept, since sentences are never split")
    group.add_argument("--strict", action="store_true", help="stop at the first bad record instead of skipping it")
    group.add_argument("--shuffle-seed", type=int, default=None,
                       help="write the documents in a random order drawn from this seed (for corpora that come "
                            "sorted, so that data.split's ranges are fair samples); a second pass over the written "
                            "dataset that needs its size again in temporary disk space; default: input order")

    group = parser.add_argument_group("tokenizer")
    group.add_argument("--tokenizer-type", required=True,
                       help="'hf' (also HuggingFaceTokenizer: a Hugging Face tokenizer.json), 'sentencepiece' (also "
                            "SentencePieceTokenizer, GPTSentencePieceTokenizer), 'tiktoken' or 'byte'")
    group.add_argument("--tokenizer-model", default=None,
                       help="hf: a tokenizer.json or a model folder holding one; sentencepiece: the .model file; "
                            "tiktoken: a local .tiktoken file")
    group.add_argument("--tokenizer-eod", default=None,
                       help="hf / tiktoken: the end-of-document token, when tokenizer_config.json names no eos_token "
                            "and the tokenizer has no <|endoftext|>, <|end_of_text|>, </s> or <eos>")
    group.add_argument("--vocab-size", type=int, default=None,
                       help="optional check: the tokenizer must have exactly this vocabulary size")
    group.add_argument("--append-eod", action="store_true", help="append the end-of-document token to each document")

    group = parser.add_argument_group("output data")
    group.add_argument("--output-prefix", required=True, help="writes {prefix}_{key}_document.bin/.idx")
    group.add_argument("--dataset-impl", default="mmap", choices=["mmap"], help="only Megatron's mmap format")

    group = parser.add_argument_group("runtime")
    group.add_argument("--workers", type=int, default=1, help="tokenizer processes")
    group.add_argument("--partitions", type=int, default=1,
                       help="accepted for compatibility; all inputs stream through one ordered pool of --workers "
                            "processes, which already uses every worker, so inputs are not partitioned")
    group.add_argument("--log-interval", type=int, default=10000,
                       help="documents between progress lines when stderr is not a terminal")
    group.add_argument("--chunk-bytes", type=int, default=1 << 20, help="input bytes per work unit")
    group.add_argument("--quiet", action="store_true", help="no progress output, only the summary")
    return parser


def _main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    # A scheduler's SIGTERM unwinds like Ctrl-C, so the temporary outputs are removed on the way out.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    if args.split_sentences:
        raise PreprocessError("--split-sentences is not supported; megaloop keeps each document as one sequence")
    if args.partitions < 1:
        raise PreprocessError("--partitions must be at least 1")
    if args.vocab_size is not None:
        actual = build_tokenizer(args.tokenizer_type, args.tokenizer_model, eod_token=args.tokenizer_eod).vocab_size
        if actual != args.vocab_size:
            raise PreprocessError(f"--vocab-size {args.vocab_size} does not match the tokenizer's {actual}")
    config = PreprocessConfig(
        input_files=expand_inputs(args.input),
        output_prefix=args.output_prefix,
        tokenizer_type=args.tokenizer_type,
        tokenizer_model=args.tokenizer_model,
        tokenizer_eod=args.tokenizer_eod,
        json_keys=args.json_keys,
        append_eod=args.append_eod,
        workers=args.workers,
        strict=args.strict,
        text_documents=args.text_documents,
        chunk_bytes=args.chunk_bytes,
        log_interval=args.log_interval,
        show_progress=not args.quiet,
        shuffle_seed=args.shuffle_seed,
    )
    summary = preprocess(config)
    print(summary.report(), file=sys.stderr)
    return 0


def main(argv=None) -> int:
    """The tool: 0, or 2 after one line on stderr for an error the user can fix (megaloop.errors.run_cli)."""
    from megaloop.errors import run_cli

    return run_cli(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
