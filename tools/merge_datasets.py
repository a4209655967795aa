"""Merge several .bin/.idx datasets into one, keeping every document boundary.

    python tools/merge_datasets.py --datasets data/a_text_document data/b_text_document \\
        --output-prefix data/ab_text_document
    python tools/merge_datasets.py --input data/shards/ --output-prefix data/all_text_document   # Megatron-style

Documents appear in the order of the inputs (a directory is taken in sorted order). The output dtype is the
narrowest that holds every input's dtype. The output is renamed into place only when complete. Errors are
one line on stderr and exit code 2 (--debug or MEGALOOP_DEBUG=1 adds the traceback).
"""
import argparse
import glob
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402

from megaloop.data.indexed_dataset import (DataError, DatasetNotFoundError, IndexedDataset,  # noqa: E402
                                           IndexedDatasetWriter, dataset_paths, missing_dataset_message)


def find_prefixes(directory: str):
    prefixes = sorted(p[:-4] for p in glob.glob(os.path.join(directory, "*.idx")))
    if not prefixes:
        if not os.path.isdir(directory):
            raise DatasetNotFoundError(f"--input {directory}: no such folder")
        raise DatasetNotFoundError(f"--input {directory}: no .idx files to merge in this folder")
    return prefixes


def merge_datasets(prefixes, output_prefix: str) -> IndexedDataset:
    if not prefixes:
        raise DataError("nothing to merge: give --datasets or --input")
    out_bin, out_idx = dataset_paths(output_prefix)
    datasets = [IndexedDataset(p) for p in prefixes]  # validates every input before writing anything
    for ds in datasets:
        if os.path.abspath(ds.bin_path) == os.path.abspath(out_bin):
            raise DataError(f"--output-prefix {output_prefix} is also an input; choose another output prefix")
    dtype = np.result_type(*[ds.dtype for ds in datasets])
    with IndexedDatasetWriter(output_prefix, dtype) as writer:
        for ds in datasets:
            writer.add_index(ds.path_prefix)
    return IndexedDataset(output_prefix)


def _main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--datasets", nargs="+", help="dataset path prefixes (globs allowed), merged in this order")
    source.add_argument("--input", help="a directory: merge every .bin/.idx pair in it, in sorted order")
    parser.add_argument("--output-prefix", required=True)
    args = parser.parse_args(argv)
    if args.input:
        prefixes = find_prefixes(args.input)
    else:
        prefixes = []
        for pattern in args.datasets:
            matches = sorted(p[:-4] for p in glob.glob(dataset_paths(pattern)[1]))
            if not matches:
                raise DatasetNotFoundError(f"--datasets: {missing_dataset_message(pattern) or pattern + ': no .idx'}")
            prefixes.extend(matches)
    merged = merge_datasets(prefixes, args.output_prefix)
    print(f"merged {len(prefixes)} datasets into {merged}", file=sys.stderr)
    return 0


def main(argv=None) -> int:
    """The tool: 0, or 2 after one line on stderr for an error the user can fix (megaloop.errors.run_cli)."""
    from megaloop.errors import run_cli

    return run_cli(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
