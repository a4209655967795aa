"""Reproduce one of the looped-model papers' claims through the real training stack, with a figure.

    python tools/reproduce.py --list
    python tools/reproduce.py flt_stability                 # default size: ~10 minutes on 2 CPU cores
    python tools/reproduce.py recall_norm --quick           # tiny models, a few steps (what the tests run)
    python tools/reproduce.py parcae_injection --write-docs # also update docs/reproductions.md
    python tools/reproduce.py flt_stability --seeds 1234,1235  # per seed; held only if held for every seed

Each claim trains its variants with pretrain_looped.py (one rank each, a subprocess), writes
OUT/<claim>/summary.csv, OUT/<claim>/figure.png and OUT/<claim>/result.json (OUT: --out, default
runs/reproduce; the demo corpus is built once under OUT/_data), and prints one verdict line saying, with the
numbers, whether the claim held at this scale. --write-docs renders the claim's section of
docs/reproductions.md (and copies its figure to docs/reproductions/); without a CLAIM it re-renders the
sections of every claim that has a result under OUT. The claims' code: megaloop/reproduce/.
"""
import argparse
import os
import shlex
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from megaloop.errors import UsageError  # noqa: E402

DOCS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "reproductions.md")


def _main(argv=None):
    import json

    from megaloop.reproduce import CLAIMS, claim_module, run_claim
    from megaloop.reproduce.runner import Context
    from megaloop.reproduce.seeds import parse_seeds

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("claim", nargs="?", help=f"one of: {', '.join(CLAIMS)}")
    p.add_argument("--list", action="store_true", help="list the claims, one line each")
    p.add_argument("--quick", action="store_true", help="tiny models and a few steps (seconds per claim)")
    p.add_argument("--out", default="runs/reproduce", help="output folder (default runs/reproduce)")
    p.add_argument("--scale", choices=("cpu", "gpu"), default="cpu",
                   help="cpu (default): sized for a few minutes per variant on 2 CPU cores; gpu: each claim's GPU "
                        "size (~15 minutes of one H100, on the machine's accelerator; see the claim's docstring)")
    p.add_argument("--seeds", default="1234",
                   help="comma-separated training seeds (default 1234): each variant trains once per seed (train.seed, "
                        "which also seeds a task's examples); the verdict holds only if it holds for every seed")
    p.add_argument("--jobs", type=int, default=1, help="variants trained at once (one process, one thread each)")
    p.add_argument("--reuse", action="store_true",
                   help="measure again the finished runs under OUT/<claim>/runs whose config is unchanged, "
                        "train only the others")
    p.add_argument("--write-docs", action="store_true", help="update docs/reproductions.md from the results")
    p.add_argument("--docs", default=DOCS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.list:
        for name in CLAIMS:
            print(f"{name:18s} {claim_module(name).SUMMARY}")
        return 0
    if args.jobs < 1:
        raise UsageError(f"--jobs {args.jobs}: must be at least 1")
    if args.claim is None and not args.write_docs:
        raise UsageError(f"name a claim ({', '.join(CLAIMS)}), or --list, or --write-docs")
    if args.claim is not None and args.claim not in CLAIMS:
        raise UsageError(f"unknown claim {args.claim!r}; known: {', '.join(CLAIMS)} (see --list)")
    seeds = parse_seeds(args.seeds)
    records = {}
    if args.claim is not None:
        ctx = Context(args.out, quick=args.quick, jobs=args.jobs, reuse=args.reuse, seeds=seeds, seed=seeds[0],
                      scale=args.scale)
        command = "python tools/reproduce.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None
                                                                                   else sys.argv[1:]))
        record = run_claim(args.claim, ctx, command)
        d = os.path.join(os.path.abspath(args.out), args.claim)
        print(f"wrote {d}/summary.csv, {d}/figure.png ({record['wall_s']:.0f} s)")
        print(record["verdict"])
        records[args.claim] = record
    elif args.write_docs:
        for name in CLAIMS:
            path = os.path.join(args.out, name, "result.json")
            if os.path.isfile(path):
                with open(path) as f:
                    records[name] = json.load(f)
        if not records:
            raise UsageError(f"--write-docs: no result.json under {args.out}/<claim>/: run a claim first")
    if args.write_docs:
        from megaloop.reproduce.docs import write_docs
        print(f"wrote {write_docs(records, os.path.abspath(args.out), args.docs)} ({', '.join(records)})")
    return 0


def main(argv=None) -> int:
    from megaloop.errors import run_cli

    return run_cli(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
