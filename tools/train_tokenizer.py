"""Train a sentencepiece tokenizer (BPE or unigram) from jsonl or text files.

    python tools/train_tokenizer.py --input data/stdlib.jsonl --model-prefix data/spm32k \
        --vocab-size 32000 --model-type bpe --input-sentence-size 2000000

Writes {model-prefix}.model and {model-prefix}.vocab. The model always has these ids:
0 <unk>, 1 <s>, 2 the end-of-document piece (--eod-piece, default <eod>, sentencepiece's eos),
3 the pad piece (--pad-piece, default <pad>); --user-defined-symbols adds more pieces that are
matched verbatim in text. Text is kept as-is (identity normalization, whitespace preserved), which
code and markup need; --byte-fallback (default on) makes every string encodable without <unk>.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from megaloop.data.text_inputs import expand_inputs, iter_documents  # noqa: E402


def iter_training_lines(paths, keys, max_line_bytes, progress):
    """Documents split into lines: sentencepiece trains on 'sentences' and skips overly long ones."""
    for text in iter_documents(paths, keys):
        progress.update(1)
        for line in text.split("\n"):
            if line.strip() and len(line) <= max_line_bytes:
                yield line


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", nargs="+", required=True, help="files or globs (.jsonl, .jsonl.gz, .txt, .txt.gz)")
    parser.add_argument("--json-keys", "--jsonl-keys", dest="json_keys", nargs="+", default=["text"])
    parser.add_argument("--model-prefix", required=True, help="writes PREFIX.model and PREFIX.vocab")
    parser.add_argument("--vocab-size", type=int, default=32000)
    parser.add_argument("--model-type", choices=["bpe", "unigram"], default="bpe")
    parser.add_argument("--byte-fallback", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--character-coverage", type=float, default=0.9995)
    parser.add_argument("--input-sentence-size", type=int, default=0,
                        help="train on a random sample of this many lines (0: all); bounds time and memory")
    parser.add_argument("--max-sentence-length", type=int, default=4192, help="longer lines are skipped (bytes)")
    parser.add_argument("--eod-piece", default="<eod>")
    parser.add_argument("--pad-piece", default="<pad>")
    parser.add_argument("--user-defined-symbols", nargs="*", default=[])
    parser.add_argument("--split-digits", action="store_true")
    parser.add_argument("--num-threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)

    import sentencepiece
    from tqdm import tqdm

    paths = expand_inputs(args.input)
    out_dir = os.path.dirname(os.path.abspath(args.model_prefix))
    os.makedirs(out_dir, exist_ok=True)
    # Train under a temporary prefix and rename when done, so an interrupted run leaves no model file.
    tmp_prefix = f"{args.model_prefix}.tmp-{os.getpid()}"
    with tqdm(desc="reading documents", unit=" docs", file=sys.stderr) as progress:
        try:
            sentencepiece.SentencePieceTrainer.train(
                sentence_iterator=iter_training_lines(paths, args.json_keys, args.max_sentence_length, progress),
                model_prefix=tmp_prefix,
                model_type=args.model_type,
                vocab_size=args.vocab_size,
                byte_fallback=args.byte_fallback,
                character_coverage=args.character_coverage,
                input_sentence_size=args.input_sentence_size,
                shuffle_input_sentence=True,
                max_sentence_length=args.max_sentence_length,
                unk_id=0, bos_id=1, eos_id=2, pad_id=3,
                unk_piece="<unk>", bos_piece="<s>", eos_piece=args.eod_piece, pad_piece=args.pad_piece,
                user_defined_symbols=args.user_defined_symbols,
                normalization_rule_name="identity",
                remove_extra_whitespaces=False,
                allow_whitespace_only_pieces=True,
                split_digits=args.split_digits,
                num_threads=args.num_threads,
                minloglevel=1,  # warnings and errors only; the tqdm bar shows progress while reading
            )
            for ext in (".model", ".vocab"):
                os.replace(tmp_prefix + ext, args.model_prefix + ext)
        finally:
            for ext in (".model", ".vocab"):
                if os.path.exists(tmp_prefix + ext):
                    os.remove(tmp_prefix + ext)
    print(f"wrote {args.model_prefix}.model ({args.model_type}, vocab {args.vocab_size}) from {len(paths)} files",
          file=sys.stderr)


if __name__ == "__main__":
    main()
