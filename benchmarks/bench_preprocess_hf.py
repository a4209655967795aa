"""Preprocessing with a Hugging Face tokenizer.json: megaloop against Megatron-LM, same input, same workers.

    python benchmarks/bench_preprocess_hf.py --workdir /tmp/bench_hf                       # megaloop alone
    python benchmarks/bench_preprocess_hf.py --workdir /tmp/bench_hf --megatron /tmp/megatron --workers 2

Trains a byte-level BPE tokenizer.json (tools/train_tokenizer.py --type bpe) on the demo corpus (the
Python standard library's sources, tools/make_demo_corpus.py), then times the whole process of

    python tools/preprocess_data.py --tokenizer-type HuggingFaceTokenizer --tokenizer-model DIR --append-eod ...
    python MEGATRON/tools/preprocess_data.py --tokenizer-type HuggingFaceTokenizer --tokenizer-model DIR \\
        --append-eod ...                                                          (with --megatron MEGATRON)

on the same jsonl with the same --workers, checks that the .bin / .idx are byte-identical, and prints
wall seconds, CPU seconds (the process and its workers) and peak RSS of the largest process. The
memory check runs megaloop on --copies times the corpus as well: its peak RSS stays the same (bounded by
workers x chunk, not by the corpus). --megatron-pythonpath is prepended to Megatron's PYTHONPATH (for
packages it needs that megaloop's environment lacks).

Measured (2026-12-07, 2 CPU cores shared with the test suite and other jobs: load average 12-25 during
the runs, so the wall times are long and noisy and the CPU seconds are the steadier figure; vocabulary 32000
trained on the demo corpus, --workers 2; Megatron-LM d98e8a64dd on Python 3.11, with
--megatron-pythonpath /tmp/mlm_shim:/tmp/mlm_deps holding a sitecustomize.py that sets typing.override =
typing_extensions.override (Megatron imports it from Python 3.12's typing) and triton, which megatron.core
imports). .bin/.idx byte-identical in every run.

    python benchmarks/bench_preprocess_hf.py --workdir /tmp/bench_hf --megatron /tmp/megatron \\
        --megatron-pythonpath /tmp/mlm_shim:/tmp/mlm_deps --workers 2 --copies 1 \\
        --source-dir .venv/lib/python3.11/site-packages --max-mb 250
    corpus source_250mb.jsonl: 261.8 MB, 15174 documents (Python sources of site-packages), 73.2 M tokens
      megaloop   wall  245.2s  CPU   52.1s  peak RSS    175 MiB
      megatron   wall 1502.6s  CPU  294.8s  peak RSS    694 MiB
    megaloop is 6.13x faster than Megatron-LM (best wall of 1); .bin/.idx byte-identical: True   (CPU: 5.7x)
    (that megaloop run kept up to 262,144 pieces per worker; with today's 131,072, same command without
    --megatron: wall 189.5s, CPU 49.5s, peak RSS 152 MiB; 450 sampled documents equal to encode_batch_fast)

    python benchmarks/bench_preprocess_hf.py --workdir /tmp/bench_hf --megatron /tmp/megatron \\
        --megatron-pythonpath /tmp/mlm_shim:/tmp/mlm_deps --workers 2 --copies 3 --per-token 8
    corpus stdlib.jsonl: 32.8 MB, 1758 documents (the demo corpus), 8.0 M tokens
    per token, one process, 8.0 MB / 444 documents / 1,908,834 tokens, best of 2 (CPU s; ...):
      megatron (transformers per document)       7.38s   0.26 M tokens/s  1.00x Megatron's
      tokenizers encode_batch_fast               6.54s   0.29 M tokens/s  1.13x Megatron's
      megaloop encode_batch_flat                 1.33s   1.43 M tokens/s  5.54x Megatron's
      same ids: True
      megaloop   wall   18.5s  CPU    6.8s  peak RSS    127 MiB
      megatron   wall  221.9s  CPU   46.2s  peak RSS    659 MiB
    megaloop is 11.99x faster than Megatron-LM (best wall of 1); .bin/.idx byte-identical: True   (CPU: 6.8x)
      megaloop x3 corpus: wall 103.0s, CPU 14.7s, peak RSS 127 MiB (x1: 127 MiB)

    (--per-token 8 on the site-packages corpus, 2.28 M tokens: Megatron's call 7.38 s, encode_batch_fast
    6.28 s, megaloop 1.48 s: 4.98x.)

What the ratio rests on: per token, from the two sizes (CPU s per extra token, 8.0 -> 73.2 M tokens):
megaloop 0.69 us, Megatron-LM 3.81 us: 5.5x, so the ratio holds on corpora of any size; the start-up
(Megatron 18 CPU s of torch / megatron.core / transformers imports, megaloop ~1.5 s) only adds to it on
small ones. Megatron-LM and megaloop's previous path both run the `tokenizers` encoder on every token
(its pre-tokenizer's per-byte offset bookkeeping is most of the cost); megaloop now splits the text with
Python's `re` and runs the tokenizer's own BPE once per distinct piece (megaloop/data/piece_cache.py:
the same ids by construction, every character probed against the tokenizers pre-tokenizer first), and
gathers a unit's ids with numpy. A tokenizer.json that piece_cache.py does not take (a normalizer other
than NFC / NFKC, other pre-tokenizers, BPE dropout) keeps the plain `tokenizers` path: ~1.15x Megatron's
per token, so only its start-up ratio (see the demo corpus figures of the previous stretch: 2.1x wall at
33 MB, ~1.3x on many GB). Peak RSS stays flat with the corpus: bounded by the workers' units in flight
and each worker's piece dict (at most 131,072 pieces, ~35 MB).
"""
import argparse
import json
import os
import subprocess
import sys
import time

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, REPO)

# Runs a command and prints the CPU seconds and the peak RSS (KiB) of its process tree's largest process.
_RUSAGE = ("import resource, subprocess, sys\n"
           "r = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)\n"
           "u = resource.getrusage(resource.RUSAGE_CHILDREN)\n"
           "print(r.stderr[-3000:], file=sys.stderr)\n"
           "print(r.returncode, u.ru_utime + u.ru_stime, u.ru_maxrss)\n")


def measured(cmd, env=None):
    """(wall s, CPU s, peak RSS MiB) of a Python script's whole process (cmd: the script and its arguments)."""
    start = time.time()
    proc = subprocess.run([sys.executable, "-c", _RUSAGE, sys.executable] + cmd, cwd=REPO, capture_output=True,
                          text=True, env=env)
    wall = time.time() - start
    rc, cpu, rss = proc.stdout.split()
    if int(rc) != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr}")
    return wall, float(cpu), int(rss) / 1024


def same_bytes(a, b) -> bool:
    return all(open(f"{a}{ext}", "rb").read() == open(f"{b}{ext}", "rb").read() for ext in (".bin", ".idx"))


def per_token(corpus, tok_dir, megabytes, rounds=2):
    """CPU seconds of the three encoders on the first `megabytes` of the corpus, in this one process,
    taking turns (best of `rounds`): Megatron-LM's call (transformers per document), the tokenizers batch
    call megaloop used before piece_cache.py, and megaloop's encode_batch_flat from an empty piece dict
    (every distinct piece of the sample through the BPE model: a large corpus's dict is warmer). Their ids
    must agree."""
    import numpy as np
    from transformers import AutoTokenizer

    from megaloop.data.tokenizer_hf import HFTokenizer

    texts, size = [], 0
    with open(corpus) as f:
        for line in f:
            texts.append(json.loads(line)["text"])
            size += len(line)
            if size >= megabytes * 10**6:
                break
    hf, ours = AutoTokenizer.from_pretrained(tok_dir), HFTokenizer(tok_dir)
    ours.encode_batch_flat(texts[:1])  # builds the fast path (~0.4 s once per worker), not timed
    encoders = {"megatron (transformers per document)": lambda: [hf(t).input_ids for t in texts],
                "tokenizers encode_batch_fast": lambda: [e.ids for e in hf.backend_tokenizer.encode_batch_fast(
                    texts, add_special_tokens=True)],
                "megaloop encode_batch_flat": lambda: ours._fast.pieces.reset() or ours.encode_batch_flat(texts)}
    best, outputs = {}, {}
    for _ in range(rounds):
        for name, encode in encoders.items():
            start = time.process_time()
            outputs[name] = encode()
            best[name] = min(best.get(name, 1e9), time.process_time() - start)
    flat, lengths = outputs["megaloop encode_batch_flat"]
    same = all(np.concatenate([np.asarray(ids, dtype=np.int64) for ids in out]).tolist() == flat.tolist()
               for name, out in outputs.items() if name != "megaloop encode_batch_flat")
    tokens = int(lengths.sum())
    print(f"per token, one process, {size / 1e6:.1f} MB / {len(texts)} documents / {tokens:,} tokens, best of "
          f"{rounds} (CPU s; megaloop's piece dict emptied before each round):")
    for name, seconds in best.items():
        print(f"  {name:40s} {seconds:6.2f}s  {tokens / seconds / 1e6:5.2f} M tokens/s  "
              f"{best['megatron (transformers per document)'] / seconds:4.2f}x Megatron's")
    print(f"  same ids: {same}")
    return best


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="/tmp/bench_preprocess_hf")
    p.add_argument("--vocab-size", type=int, default=32000)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--copies", type=int, default=3, help="memory check: megaloop on this many copies of the corpus")
    p.add_argument("--megatron", default=None, help="a Megatron-LM checkout: also run its tools/preprocess_data.py")
    p.add_argument("--megatron-pythonpath", default="", help="prepended to PYTHONPATH for Megatron's run")
    p.add_argument("--source-dir", default=None, help="time on the .py files under this folder (make_demo_corpus.py "
                   "--source-dir) instead of the demo corpus; the tokenizer is still trained on the demo corpus")
    p.add_argument("--max-mb", type=int, default=None, help="with --source-dir: this many MB of it")
    p.add_argument("--per-token", type=float, default=0, metavar="MB", help="also time the encoders alone, "
                   "in this process, on the first MB of the corpus (0: skip)")
    args = p.parse_args()
    os.makedirs(args.workdir, exist_ok=True)
    py = sys.executable
    corpus = os.path.join(args.workdir, "stdlib.jsonl")
    if not os.path.exists(corpus):
        subprocess.run([py, "tools/make_demo_corpus.py", "--output", corpus], cwd=REPO, check=True)
    tok_dir = os.path.join(args.workdir, f"bpe{args.vocab_size}")
    if not os.path.exists(os.path.join(tok_dir, "tokenizer.json")):
        wall, _, _ = measured(["tools/train_tokenizer.py", "--type", "bpe", "--input", corpus, "--model-prefix",
                               tok_dir, "--vocab-size", str(args.vocab_size)])
        print(f"trained {tok_dir} in {wall:.1f}s")
    if args.source_dir:
        corpus = os.path.join(args.workdir, f"source_{args.max_mb or 'all'}mb.jsonl")
        if not os.path.exists(corpus):
            limit = ["--max-bytes", str(args.max_mb * 10**6)] if args.max_mb else []
            subprocess.run([py, "tools/make_demo_corpus.py", "--output", corpus, "--source-dir", args.source_dir,
                            "--include-site-packages"] + limit, cwd=REPO, check=True)
    docs = sum(1 for _ in open(corpus))
    print(f"corpus {corpus}: {os.path.getsize(corpus) / 1e6:.1f} MB, {docs} documents; tokenizer {tok_dir}; "
          f"--workers {args.workers}", flush=True)
    if args.per_token:
        per_token(corpus, tok_dir, args.per_token)
    common = ["--input", corpus, "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", tok_dir,
              "--append-eod", "--workers", str(args.workers)]
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    results = {}

    def run(name, cmd, out, run_env):
        for _ in range(args.repeats):
            wall, cpu, rss = measured(cmd + ["--output-prefix", out], run_env)
            results.setdefault(name, []).append((wall, cpu, rss))
            print(f"  {name:10s} wall {wall:6.1f}s  CPU {cpu:6.1f}s  peak RSS {rss:6.0f} MiB", flush=True)
        return min(r[0] for r in results[name])

    ours = run("megaloop", ["tools/preprocess_data.py", "--quiet"] + common,
               os.path.join(args.workdir, "megaloop"), env)
    if args.megatron:
        mlm_env = dict(env, PYTHONPATH=os.pathsep.join(x for x in (args.megatron_pythonpath, args.megatron) if x))
        theirs = run("megatron", [os.path.join(args.megatron, "tools", "preprocess_data.py")] + common,
                     os.path.join(args.workdir, "megatron"), mlm_env)
        identical = same_bytes(os.path.join(args.workdir, "megaloop_text_document"),
                               os.path.join(args.workdir, "megatron_text_document"))
        print(f"megaloop is {theirs / ours:.2f}x faster than Megatron-LM (best wall of {args.repeats}); "
              f".bin/.idx byte-identical: {identical}")
        results["speedup"], results["identical"] = theirs / ours, identical
    if args.copies > 1:
        big = os.path.join(args.workdir, f"stdlib_x{args.copies}.jsonl")
        if not os.path.exists(big):
            with open(big, "wb") as f:
                for _ in range(args.copies):
                    f.write(open(corpus, "rb").read())
        cmd = ["tools/preprocess_data.py", "--quiet"] + common
        cmd[cmd.index(corpus)] = big
        wall, cpu, rss = measured(cmd + ["--output-prefix", os.path.join(args.workdir, "big")], env)
        print(f"  megaloop x{args.copies} corpus: wall {wall:.1f}s, CPU {cpu:.1f}s, peak RSS {rss:.0f} MiB "
              f"(x1: {results['megaloop'][0][2]:.0f} MiB)")
        results["copies_rss_mib"] = rss
    print(json.dumps(results))


if __name__ == "__main__":
    main()
