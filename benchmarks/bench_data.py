"""Data pipeline benchmarks: preprocessing throughput, index building, sample reads, blending.

    python benchmarks/bench_data.py --workdir /tmp/bench_data          # everything, about 2 minutes on 2 cores
    python benchmarks/bench_data.py --skip-preprocess --documents 1000000

Preprocessing runs tools/preprocess_data.py as a subprocess and times the whole process (startup, model
load, tokenization, writing), on the demo corpus (the Python standard library's sources) with a
sentencepiece BPE model trained here, for each --workers value. The reading benchmarks use a synthetic
dataset of --documents documents.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, REPO)

from megaloop.data.blended_dataset import build_blending_indices  # noqa: E402
from megaloop.data.gpt_dataset import GPTDataset  # noqa: E402
from megaloop.data.indexed_dataset import IndexedDataset, IndexedDatasetWriter  # noqa: E402


def run_tool(args):
    """(wall seconds, CPU seconds of the process and all its workers) of one tool run."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.time()
    proc = subprocess.run([sys.executable] + args, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed:\n{proc.stderr}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return time.time() - start, cpu


def bench_preprocess(workdir, vocab_size, sentence_sample, workers_list, repeats, results):
    corpus = os.path.join(workdir, "stdlib.jsonl")
    if not os.path.exists(corpus):
        run_tool(["tools/make_demo_corpus.py", "--output", corpus])
    model_prefix = os.path.join(workdir, f"spm{vocab_size}")
    if not os.path.exists(model_prefix + ".model"):
        seconds, _ = run_tool(["tools/train_tokenizer.py", "--input", corpus, "--model-prefix", model_prefix,
                               "--vocab-size", str(vocab_size), "--model-type", "bpe",
                               "--input-sentence-size", str(sentence_sample)])
        results["tokenizer_training_s"] = round(seconds, 1)
    corpus_mb = os.path.getsize(corpus) / 1e6
    print(f"corpus {corpus} ({corpus_mb:.1f} MB); sentencepiece BPE vocab {vocab_size}, "
          f"trained on {'all' if not sentence_sample else sentence_sample} lines", flush=True)

    def measure(name, args, out):
        # Wall time is the figure that matters, but on a shared machine it depends on the neighbours;
        # CPU seconds (all processes) per token do not, so both are reported.
        seconds, cpu = run_tool(args)
        tokens = int(IndexedDataset(out).sequence_lengths.sum(dtype=np.int64))
        results.setdefault(f"{name}_Mtok_s", []).append(round(tokens / seconds / 1e6, 3))
        results.setdefault(f"{name}_cpu_s", []).append(round(cpu, 2))
        print(f"{name:30s}: {tokens:,} tokens in {seconds:5.2f}s whole process = {tokens / seconds / 1e6:5.2f} M "
              f"tokens/s ({corpus_mb / seconds:4.1f} MB/s); {cpu:5.2f} CPU-s in all processes "
              f"(load average {os.getloadavg()[0]:.1f})", flush=True)

    def ours(tokenizer, workers):
        out = os.path.join(workdir, f"out_{tokenizer}_{workers}")
        args = ["tools/preprocess_data.py", "--input", corpus, "--output-prefix", out, "--tokenizer-type",
                tokenizer, "--append-eod", "--workers", str(workers), "--quiet"]
        if tokenizer == "sentencepiece":
            args += ["--tokenizer-model", model_prefix + ".model"]
        measure(f"megaloop {tokenizer} {workers}w", args, out + "_text_document")

    # Interleaved, so that both see the same load on a shared machine.
    for _ in range(repeats):
        for workers in workers_list:
            out = os.path.join(workdir, f"baseline_{workers}")
            measure(f"megatron-style baseline {workers}w", ["benchmarks/bench_data.py", "--megatron-baseline", corpus,
                                                         model_prefix + ".model", str(workers), out], out)
            ours("sentencepiece", workers)
    for workers in workers_list:
        ours("byte", workers)


# -- A baseline with Megatron-LM's preprocess_data.py structure, to compare on the same (shared, noisy) machine.
# Megatron-LM itself cannot be installed here (no network); this transcribes its hot path: the main process
# reads lines and feeds Pool.imap(encode, lines, chunksize=32); each worker json-decodes one document and
# encodes it with sentencepiece's encode_as_ids (GPTSentencePieceTokenizer.tokenize) and returns a Python
# list; the main process converts every list with numpy.array and writes it (IndexedDatasetBuilder).
_baseline = {}


def _baseline_init(model):
    import sentencepiece

    _baseline["sp"] = sentencepiece.SentencePieceProcessor(model_file=model)


def _baseline_encode(line):
    sp = _baseline["sp"]
    text = json.loads(line)["text"]
    ids = sp.encode_as_ids(text)
    if ids:
        ids.append(sp.eos_id())
    return ids, [len(ids)], len(line)


def megatron_baseline(corpus, model, workers, output_prefix):
    import multiprocessing

    pool = multiprocessing.Pool(workers, initializer=_baseline_init, initargs=(model,))
    with open(corpus, encoding="utf-8") as fin, IndexedDatasetWriter(output_prefix, np.uint16) as writer:
        for ids, lengths, _ in pool.imap(_baseline_encode, fin, 32):
            writer.add_document(np.array(ids, dtype=np.uint16), lengths)
    pool.close()
    pool.join()


def make_synthetic(prefix, num_documents, mean_length, seed=0):
    rng = np.random.RandomState(seed)
    lengths = rng.randint(1, 2 * mean_length, size=num_documents).astype(np.int64)
    tokens = (np.arange(int(lengths.sum()), dtype=np.int64) % 32000).astype(np.uint16)
    with IndexedDatasetWriter(prefix, np.uint16) as writer:
        writer.add_documents(tokens, lengths)


def timed(fn):
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


def bench_reading(workdir, num_documents, mean_length, seq_len, num_samples_list, reads, results):
    prefix = os.path.join(workdir, f"synthetic_{num_documents}")
    if not os.path.exists(prefix + ".idx"):
        _, seconds = timed(lambda: make_synthetic(prefix, num_documents, mean_length))
        print(f"wrote synthetic dataset: {num_documents:,} documents in {seconds:.1f}s", flush=True)
    indexed, seconds = timed(lambda: IndexedDataset(prefix))
    total_tokens = int(indexed.sequence_lengths.sum(dtype=np.int64))
    results["open_indexed_dataset_s"] = round(seconds, 4)
    print(f"open {num_documents:,} documents / {total_tokens:,} tokens (with validation): {seconds * 1e3:.1f} ms")

    cache_dir = os.path.join(workdir, "cache")
    for num_samples in num_samples_list:
        build = lambda: GPTDataset(indexed, (0, num_documents), seq_len, num_samples, seed=1234)  # noqa: E731
        ds, seconds = timed(build)
        epochs = len(ds.document_index) // num_documents
        results[f"index_build_{num_samples}_samples_s"] = round(seconds, 3)
        print(f"index build: {num_documents:,} documents, {num_samples:,} samples of {seq_len} "
              f"({epochs} epochs, {len(ds.document_index):,} document-index entries): {seconds:.2f}s")
    cached = lambda: GPTDataset(indexed, (0, num_documents), seq_len, num_samples_list[-1], 1234, cache_dir)  # noqa
    timed(cached)  # build + save
    ds, seconds = timed(cached)
    results["index_cache_load_s"] = round(seconds, 4)
    print(f"index load from cache (memory-mapped): {seconds * 1e3:.1f} ms")

    rng = np.random.RandomState(0)
    order = rng.randint(0, len(ds), size=reads)
    for i in order[:100]:
        ds[int(i)]  # warm the page cache a little, as a running job would have
    _, seconds = timed(lambda: [ds[int(i)] for i in order])
    per_second = reads / seconds
    results["sample_reads_per_s"] = round(per_second)
    results["sample_read_Mtok_s"] = round(per_second * (seq_len + 1) / 1e6, 1)
    print(f"random sample reads: {per_second:,.0f} samples/s of {seq_len + 1} tokens "
          f"= {per_second * (seq_len + 1) / 1e6:.0f} M tokens/s ({seconds / reads * 1e6:.0f} us per sample)")


def bench_blending(num_samples, results):
    for weights in ([0.7, 0.3], [0.5, 0.3, 0.2], [0.1] * 10):
        _, seconds = timed(lambda: build_blending_indices(weights, num_samples))
        results[f"blend_{len(weights)}_datasets_{num_samples}_s"] = round(seconds, 3)
        print(f"blending indices, {len(weights)} datasets, {num_samples:,} samples: {seconds:.2f}s")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="/tmp/megaloop_bench_data")
    parser.add_argument("--vocab-size", type=int, default=32000)
    parser.add_argument("--sentence-sample", type=int, default=0, help="lines to train the tokenizer on, 0 = all")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--documents", type=int, default=1_000_000)
    parser.add_argument("--mean-length", type=int, default=128, help="mean synthetic document length (tokens)")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--num-samples", type=int, nargs="+", default=[50_000, 1_000_000])
    parser.add_argument("--reads", type=int, default=20_000)
    parser.add_argument("--blend-samples", type=int, default=1_000_000)
    parser.add_argument("--skip-preprocess", action="store_true")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each preprocessing measurement")
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument("--megatron-baseline", nargs=4, metavar=("CORPUS", "MODEL", "WORKERS", "OUT"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.megatron_baseline:
        corpus, model, workers, out = args.megatron_baseline
        megatron_baseline(corpus, model, int(workers), out)
        return

    os.makedirs(args.workdir, exist_ok=True)
    results = {"cpus": os.cpu_count()}
    if not args.skip_preprocess:
        bench_preprocess(args.workdir, args.vocab_size, args.sentence_sample, args.workers, args.repeats, results)
    bench_reading(args.workdir, args.documents, args.mean_length, args.seq_len, args.num_samples, args.reads,
                  results)
    bench_blending(args.blend_samples, results)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
