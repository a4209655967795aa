"""Train a tokenizer from jsonl, text or parquet files or a datasets folder (the inputs tools/preprocess_data.py
reads): a Hugging Face byte-level BPE tokenizer.json (--type bpe) or a sentencepiece model (BPE or unigram, the
default --type sentencepiece).

    python tools/train_tokenizer.py --type bpe --input data/stdlib.jsonl --model-prefix data/bpe32k \
        --vocab-size 32000
    python tools/train_tokenizer.py --input data/stdlib.jsonl --model-prefix data/spm32k \
        --vocab-size 32000 --model-type bpe --input-sentence-size 2000000

--type bpe writes the folder {model-prefix}/ with tokenizer.json and tokenizer_config.json (trained with
the `tokenizers` library; GPT-2's byte-level scheme, so every string is encodable): preprocess it with
`--tokenizer-type hf --tokenizer-model {model-prefix}` (Megatron-LM's `--tokenizer-type HuggingFaceTokenizer
--tokenizer-model {model-prefix}` reads the same folder), and `AutoTokenizer.from_pretrained` loads it.
Its ids: 0 the end-of-document token (--eod-piece, default <|endoftext|>, the eos_token), 1 the pad token
(--pad-piece, default <|pad|>), then --user-defined-symbols, the 256 bytes and the merges;
--input-sentence-size N trains on the first N documents.

--type sentencepiece:
writes {model-prefix}.model and {model-prefix}.vocab. The model always has these ids:
0 <unk>, 1 <s>, 2 the end-of-document piece (--eod-piece, default <eod>, sentencepiece's eos),
3 the pad piece (--pad-piece, default <pad>); --user-defined-symbols adds more pieces that are
matched verbatim in text. Text is kept as-is (identity normalization, whitespace preserved), which
code and markup need; --byte-fallback (default on) makes every string encodable without <unk>.
Errors (no usable text in the inputs, with the reasons records were skipped; a truncated .gz / .zst, a corrupt
parquet file; a vocabulary too large for the text) are one line on stderr and exit code 2, and leave no model
file; --debug or MEGALOOP_DEBUG=1 adds the traceback.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from megaloop.data.indexed_dataset import DataError  # noqa: E402
from megaloop.data.text_inputs import SkipCounter, expand_inputs, iter_documents  # noqa: E402


def iter_training_lines(paths, keys, max_line_bytes, progress, skipped=None):
    """Documents split into lines: sentencepiece trains on 'sentences' and skips overly long ones."""
    for text in iter_documents(paths, keys, skipped):
        progress.update(1)
        for line in text.split("\n"):
            if line.strip() and len(line) <= max_line_bytes:
                yield line
            elif line.strip() and skipped is not None:
                skipped.add(f"line longer than --max-sentence-length {max_line_bytes}", "a document")


def no_text_message(paths, keys, skipped) -> str:
    what = f"no training text in {len(paths)} input file{'s' if len(paths) != 1 else ''} " \
           f"({', '.join(paths[:3])}{', ...' if len(paths) > 3 else ''}); no model written"
    if skipped.total:
        return f"{what}: {skipped.total:,} records skipped: {skipped.summary()} (--json-keys is {', '.join(keys)})"
    return f"{what}: the inputs are empty"


def _main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", nargs="+", required=True,
                        help="files, globs or folders, as tools/preprocess_data.py reads them (.jsonl, .json, .txt, "
                             "plain, .gz or .zst; .parquet; a datasets save_to_disk folder)")
    parser.add_argument("--json-keys", "--jsonl-keys", dest="json_keys", nargs="+", default=["text"])
    parser.add_argument("--type", choices=["sentencepiece", "bpe"], default="sentencepiece",
                        help="bpe: a Hugging Face byte-level BPE tokenizer.json; sentencepiece: a .model file")
    parser.add_argument("--model-prefix", "--output", dest="model_prefix", required=True,
                        help="sentencepiece: writes PREFIX.model and PREFIX.vocab; bpe: the folder PREFIX/ with "
                             "tokenizer.json and tokenizer_config.json")
    parser.add_argument("--vocab-size", type=int, default=32000)
    parser.add_argument("--model-type", choices=["bpe", "unigram"], default="bpe", help="sentencepiece's algorithm")
    parser.add_argument("--byte-fallback", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--character-coverage", type=float, default=0.9995)
    parser.add_argument("--input-sentence-size", type=int, default=0,
                        help="train on a random sample of this many lines (0: all); bounds time and memory")
    parser.add_argument("--max-sentence-length", type=int, default=4192, help="longer lines are skipped (bytes)")
    parser.add_argument("--eod-piece", default=None, help="default <eod> (sentencepiece), <|endoftext|> (bpe)")
    parser.add_argument("--pad-piece", default=None, help="default <pad> (sentencepiece), <|pad|> (bpe)")
    parser.add_argument("--user-defined-symbols", nargs="*", default=[])
    parser.add_argument("--split-digits", action="store_true")
    parser.add_argument("--num-threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)

    import sentencepiece
    from tqdm import tqdm

    paths = expand_inputs(args.input)
    if args.type == "bpe":
        return _train_bpe(args, paths)
    args.eod_piece, args.pad_piece = args.eod_piece or "<eod>", args.pad_piece or "<pad>"
    if args.vocab_size < 4 + len(args.user_defined_symbols):
        raise DataError(f"--vocab-size {args.vocab_size}: too small for the 4 special pieces and "
                        f"{len(args.user_defined_symbols)} --user-defined-symbols")
    # Fail before training on no usable text at all, with the reasons the records were skipped.
    skipped = SkipCounter()
    first = next(iter_training_lines(paths, args.json_keys, args.max_sentence_length, _NoProgress(), skipped), None)
    if first is None:
        raise DataError(no_text_message(paths, args.json_keys, skipped))
    out_dir = os.path.dirname(os.path.abspath(args.model_prefix))
    os.makedirs(out_dir, exist_ok=True)
    # Train under a temporary prefix and rename when done, so an interrupted run leaves no model file.
    tmp_prefix = f"{args.model_prefix}.tmp-{os.getpid()}"
    reader_error = []  # sentencepiece reports an exception of the sentence iterator as its own RuntimeError

    def sentences(progress):
        try:
            yield from iter_training_lines(paths, args.json_keys, args.max_sentence_length, progress)
        except Exception as e:
            reader_error.append(e)
            raise
    # The bar only on a terminal: in a log file its redraws are noise.
    with tqdm(desc="reading documents", unit=" docs", file=sys.stderr, disable=not sys.stderr.isatty()) as progress:
        try:
            sentencepiece.SentencePieceTrainer.train(
                sentence_iterator=sentences(progress),
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
        except RuntimeError as e:  # sentencepiece's own checks, e.g. a vocabulary larger than the text allows
            if reader_error:
                raise reader_error[0] from None  # e.g. a truncated .gz: its own one-line DataError
            why = " ".join(str(e).split())
            if "Vocabulary size" in why:
                why += " (lower --vocab-size, or give more text)"
            raise DataError(f"sentencepiece could not train {args.model_prefix}.model from {len(paths)} files: "
                            f"{why}") from e
        else:
            for ext in (".model", ".vocab"):
                os.replace(tmp_prefix + ext, args.model_prefix + ext)
        finally:
            for ext in (".model", ".vocab"):
                if os.path.exists(tmp_prefix + ext):
                    os.remove(tmp_prefix + ext)
    print(f"wrote {args.model_prefix}.model ({args.model_type}, vocab {args.vocab_size}) from {len(paths)} files",
          file=sys.stderr)


def _train_bpe(args, paths):
    """--type bpe: megaloop.data.tokenizer_hf.train_bpe on the documents (whole: byte-level BPE needs no
    sentence split), first checking that there is text at all."""
    from itertools import islice

    from megaloop.data.tokenizer_hf import train_bpe

    specials = [args.eod_piece or "<|endoftext|>", args.pad_piece or "<|pad|>"] + list(args.user_defined_symbols)
    if args.vocab_size < 256 + len(specials):
        raise DataError(f"--vocab-size {args.vocab_size}: a byte-level BPE needs at least 256 byte tokens plus "
                        f"{len(specials)} special tokens")
    skipped = SkipCounter()
    if next(iter_documents(paths, args.json_keys, skipped), None) is None:
        raise DataError(no_text_message(paths, args.json_keys, skipped))
    os.environ.setdefault("RAYON_NUM_THREADS", str(max(1, args.num_threads)))  # the trainer's thread pool
    documents = iter_documents(paths, args.json_keys)
    if args.input_sentence_size > 0:
        documents = islice(documents, args.input_sentence_size)
    reached = train_bpe(documents, args.model_prefix, args.vocab_size, specials[0], specials[1], specials[2:],
                        split_digits=args.split_digits, show_progress=sys.stderr.isatty())
    print(f"wrote {os.path.join(args.model_prefix, 'tokenizer.json')} (byte-level BPE, vocab {reached}"
          f"{f' of the {args.vocab_size} asked: the text allows no more merges' if reached < args.vocab_size else ''}"
          f") from {len(paths)} files", file=sys.stderr)


class _NoProgress:
    def update(self, n):
        pass


def main(argv=None) -> int:
    """The tool: 0, or 2 after one line on stderr for an error the user can fix (megaloop.errors.run_cli)."""
    from megaloop.errors import run_cli

    return run_cli(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
