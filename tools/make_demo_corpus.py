"""Gather text that every machine already has -- the Python standard library's sources -- into jsonl.

One JSON object {"text": <file contents>, "path": <relative path>} per line, so the demo needs no download:

    python tools/make_demo_corpus.py --output data/stdlib.jsonl

The files are written in a shuffled order, the same for every run with the same --seed (and the same Python):
in file order the last documents, which a Megatron-style split (data.split "98,2,0") makes the validation set,
would all be codec mapping tables (encodings/cp*.py), and --max-bytes would keep only the alphabetically first
packages. Shuffled, validation and any --max-bytes prefix are a fair sample of the whole library.

Errors (a missing --source-dir, an unwritable or full output folder) are one line on stderr and exit code 2,
and leave no partial file; --debug or MEGALOOP_DEBUG=1 adds the traceback.
"""
import argparse
import errno
import json
import os
import random
import sys


def stdlib_dir() -> str:
    # The os module lives at the root of the standard library, whatever the install layout.
    return os.path.dirname(os.__file__)


def iter_source_files(root: str, include_site_packages: bool):
    """Yield .py files under root in a fixed (sorted) order, so the corpus is reproducible."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        if not include_site_packages:
            # site-packages holds third-party code, not the standard library (and it can be huge).
            dirnames[:] = [d for d in dirnames if d not in ("site-packages", "dist-packages", "__pycache__")]
        for name in sorted(filenames):
            if name.endswith(".py"):
                yield os.path.join(dirpath, name)


def shuffled_source_files(root: str, include_site_packages: bool, seed: int):
    """The sorted file list in a seeded random order: only paths are held, the texts are read one at a time."""
    paths = list(iter_source_files(root, include_site_packages))
    random.Random(seed).shuffle(paths)
    return paths


def _main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", required=True, help="jsonl file to write")
    parser.add_argument("--source-dir", default=None, help="directory to gather (default: the standard library)")
    parser.add_argument("--max-bytes", type=int, default=None, help="stop after this many bytes of text")
    parser.add_argument("--include-site-packages", action="store_true")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the document order (the files are shuffled so that a split is representative)")
    args = parser.parse_args(argv)

    root = args.source_dir or stdlib_dir()
    if not os.path.isdir(root):
        raise FileNotFoundError(errno.ENOENT, "no such folder (--source-dir)", root)
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    tmp_path = f"{args.output}.tmp-{os.getpid()}"
    n_files, n_bytes, n_unreadable = 0, 0, 0
    try:
        with open(tmp_path, "w", encoding="utf-8") as out:
            for path in shuffled_source_files(root, args.include_site_packages, args.seed):
                try:
                    with open(path, encoding="utf-8") as f:
                        text = f.read()
                except (UnicodeDecodeError, OSError):
                    n_unreadable += 1  # a few test files are deliberately not UTF-8
                    continue
                if not text.strip():
                    continue
                out.write(json.dumps({"text": text, "path": os.path.relpath(path, root)}) + "\n")
                n_files += 1
                n_bytes += len(text.encode("utf-8"))
                if args.max_bytes is not None and n_bytes >= args.max_bytes:
                    break
        os.replace(tmp_path, args.output)
    except BaseException as e:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
        if isinstance(e, OSError):
            sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
            from megaloop.errors import OutputError

            raise OutputError(e, os.path.dirname(os.path.abspath(args.output)),
                              f"nothing was written to {args.output}") from e
        raise
    print(f"wrote {n_files} documents, {n_bytes / 1e6:.1f} MB of text from {root} to {args.output}"
          f" ({n_unreadable} files skipped as not UTF-8)", file=sys.stderr)


def main(argv=None) -> int:
    """The tool: 0, or 2 after one line on stderr for an error the user can fix (megaloop.errors.run_cli)."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    from megaloop.errors import run_cli

    return run_cli(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
