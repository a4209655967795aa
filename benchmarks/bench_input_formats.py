"""Preprocessing by input format: wall time, CPU time and the peak memory of the largest process.

    python benchmarks/bench_input_formats.py --workdir /tmp/bench_formats

One corpus (the Python standard library's sources, tools/make_demo_corpus.py, about 30 MB of text) written
as .jsonl, .jsonl.gz, .jsonl.zst, .parquet (--row-group-rows rows per row group) and a Hugging Face datasets
folder (save_to_disk), each tokenized by tools/preprocess_data.py as a subprocess with the byte tokenizer
(cheap, so reading and writing dominate), --workers 2; then .jsonl again with --shuffle-seed. Every output
is checked to be byte-identical to the .jsonl one (the shuffled one to hold the same documents). Peak memory
is ru_maxrss over the tool and its workers (the largest single process; the tool's imports alone are
about 100 MiB).

Measured on 2 shared CPU cores (other jobs running; wall times are noisy), 2026-12-07:

    python benchmarks/bench_input_formats.py --workdir /tmp/bench_formats               (--repeat 4 below)
    1,758 documents, 32.8 MB of jsonl                 7,032 documents, 131.2 MB of jsonl (--repeat 4)
    input                  wall s  CPU s  peak MiB    wall s  CPU s  peak MiB  output
    .jsonl                    4.4    1.3        63       8.3    3.9        64  identical
    .jsonl.gz                 6.1    1.6        68       9.5    4.4        66  identical
    .jsonl.zst                6.8    1.6        76       8.4    4.0        89  identical
    .parquet (256 rows/group) 8.0    1.9       136       7.2    3.5       169  identical
    datasets folder           4.8    1.5       181       9.7    3.9       227  identical
    .jsonl --shuffle-seed 1   9.1    2.6       300      17.7    6.3       499  same tokens

Line files and parquet stay flat as the corpus grows 4x (a parquet row group is the unit). The datasets
folder and the shuffle pass read through memory maps, whose resident pages count in RSS (page cache the
kernel reclaims under pressure), so their peaks grow with the files; their private memory is a work unit
(datasets) or one gather block of 8M tokens plus a few integers per document (shuffle).
"""
import argparse
import gzip
import json
import os
import resource
import subprocess
import sys
import time

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, REPO)


# A fresh wrapper process per run: RUSAGE_CHILDREN's ru_maxrss is the largest descendant it ever waited for.
_WRAPPER = ("import resource, subprocess, sys; p = subprocess.run(sys.argv[1:]); "
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(p.returncode)")


def run_tool(args):
    """(wall seconds, CPU seconds, peak RSS MiB of the largest process) of one tool run."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.time()
    proc = subprocess.run([sys.executable, "-c", _WRAPPER, sys.executable] + args, cwd=REPO, capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": REPO})
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed:\n{proc.stderr}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return time.time() - start, cpu, int(proc.stdout.split()[-1]) / 1024


def write_formats(workdir, row_group_rows, repeat):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    jsonl = os.path.join(workdir, "corpus.jsonl")
    if not os.path.exists(jsonl):
        run_tool(["tools/make_demo_corpus.py", "--output", jsonl])
    raw = open(jsonl, "rb").read() * repeat
    if repeat > 1:
        jsonl = os.path.join(workdir, f"corpus_x{repeat}.jsonl")
        with open(jsonl, "wb") as f:
            f.write(raw)
    with gzip.open(jsonl + ".gz", "wb", compresslevel=6) as f:
        f.write(raw)
    with open(jsonl + ".zst", "wb") as f:
        f.write(zstandard.ZstdCompressor(level=3).compress(raw))
    records = [json.loads(line) for line in raw.splitlines()]
    stem = os.path.basename(jsonl)[:-len(".jsonl")]
    pq.write_table(pa.Table.from_pylist(records), os.path.join(workdir, stem + ".parquet"),
                   row_group_size=row_group_rows)
    datasets.disable_progress_bars()
    datasets.Dataset.from_list(records).save_to_disk(os.path.join(workdir, stem + "_hf"), num_shards=2)
    return stem, len(records), len(raw)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="/tmp/bench_formats")
    parser.add_argument("--row-group-rows", type=int, default=256)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=1, help="the corpus this many times over (memory vs size)")
    args = parser.parse_args()
    os.makedirs(args.workdir, exist_ok=True)
    stem, docs, nbytes = write_formats(args.workdir, args.row_group_rows, args.repeat)
    print(f"{docs:,} documents, {nbytes / 1e6:.1f} MB of jsonl; --workers {args.workers}, byte tokenizer")
    print(f"{'input':<30} {'wall s':>7} {'CPU s':>7} {'peak MiB':>9}  output")
    reference = None
    runs = [(stem + ".jsonl", []), (stem + ".jsonl.gz", []), (stem + ".jsonl.zst", []), (stem + ".parquet", []),
            (stem + "_hf", []), (stem + ".jsonl", ["--shuffle-seed", "1"])]
    for name, extra in runs:
        prefix = os.path.join(args.workdir, "out_" + name.replace(".", "_") + ("_shuffled" if extra else ""))
        wall, cpu, peak = run_tool(["tools/preprocess_data.py", "--input", os.path.join(args.workdir, name),
                                    "--output-prefix", prefix, "--tokenizer-type", "byte", "--workers",
                                    str(args.workers), "--quiet", *extra])
        data = [open(f"{prefix}_text_document{ext}", "rb").read() for ext in (".bin", ".idx")]
        if reference is None:
            reference = data
        same = data == reference if not extra else sorted(data[0]) == sorted(reference[0])
        label = name + (" --shuffle-seed 1" if extra else "")
        print(f"{label:<30} {wall:7.1f} {cpu:7.1f} {peak:9.0f}  {'identical' if same else 'DIFFERENT'}"
              f"{' (same tokens)' if extra and same else ''}", flush=True)


if __name__ == "__main__":
    main()
