"""Plan a run on a cluster: per pipeline stage and TP rank, the exact parameter count (meta-device
modules, TP applied; no memory allocated), weight / gradient / optimizer memory under the precision
recipe and ZeRO over DP, activation memory (R, activation checkpointing, the micro-batches a 1F1B stage
holds in flight), TP communication per step, model FLOPs; the step time at a stated MFU, the pipeline
bubble, tokens/s per GPU and for the cluster, and the time to a token budget. --search lists the
layouts (TP, PP, DP, ZeRO, micro-batch, activation checkpointing) that the config validator accepts
and that fit, fastest first, as override lines.

    python tools/plan.py --config yaml_configs/flt_350m_8gpu.yaml --world 8 --gpu h200
    python tools/plan.py --config CFG --nodes 4 --gpus-per-node 8 --gpu a100 parallel.pipeline_parallel=2 --json
    python tools/plan.py --config CFG --gpu B200:2.25e15:180:8e12 --mfu 0.35 --tokens 1e12
    python tools/plan.py --config yaml_configs/ouro_1p4b_16gpu.yaml --nodes 2 --gpus-per-node 8 --search

--gpu: h100 | h200 (989 TFLOP/s dense bf16, 80 / 141 GiB) | a100 (312 TFLOP/s, 80 GiB) |
NAME:peak_flops:mem_gib:bw. --world defaults to tensor_parallel x pipeline_parallel (DP 1). Positional
key=value arguments override the config as in pretrain_looped.py. The GPU's numbers and --tokens must be
positive; a loop count (the fixed loop.mean, or loop.max when sampled; model.loops) above --max-loops
(default 256) is refused. Errors are one line on stderr and exit code 2.
"""
import argparse
import json
import math
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from megaloop.cli_checks import add_max_loops_flag, check_loops  # noqa: E402
from megaloop.errors import UsageError  # noqa: E402


def _main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("overrides", nargs="*", help="config overrides, section.key=value")
    p.add_argument("--world", type=int, default=None, help="number of GPUs")
    p.add_argument("--nodes", type=int, default=None)
    p.add_argument("--gpus-per-node", type=int, default=None)
    p.add_argument("--gpu", default="h100", help="h100 | h200 | a100 | NAME:peak_flops:mem_gib:bw")
    p.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilisation assumed for the step time")
    p.add_argument("--tokens", type=float, default=None, help="token budget (default: train.steps x tokens/step)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument("--search", action="store_true", help="rank the layouts that fit (override lines)")
    p.add_argument("--top", type=int, default=5, help="--search: how many layouts to print")
    p.add_argument("--headroom", type=float, default=0.9,
                   help="--search: fraction of the GPU memory a layout may plan for (default 0.9)")
    add_max_loops_flag(p)
    args = p.parse_args(argv)
    if args.world is not None and (args.nodes is not None or args.gpus_per_node is not None):
        p.error("give either --world or --nodes with --gpus-per-node")
    world = args.world
    if args.nodes is not None or args.gpus_per_node is not None:
        if args.nodes is None or args.gpus_per_node is None:
            p.error("--nodes and --gpus-per-node go together")
        world = args.nodes * args.gpus_per_node

    from megaloop.config import load_config
    from megaloop.planner import format_plan, make_plan, parse_gpu

    cfg = load_config(args.config, args.overrides)
    gpu = parse_gpu(args.gpu)
    if args.tokens is not None and not (math.isfinite(args.tokens) and args.tokens > 0):
        raise UsageError(f"--tokens {args.tokens:g}: the token budget must be a positive finite number")
    # The loop counts the plan models: the fixed R, or the largest sampled one (and the trained model.loops).
    check_loops(f"loop.mean={cfg.loop.mean:g} / loop.max={cfg.loop.max} / model.loops={cfg.model.loops}",
                [cfg.loop.mean if cfg.loop.sampling == "fixed" else cfg.loop.max, cfg.model.loops], args.max_loops)
    if args.search:
        from megaloop.planner.search import format_search, search

        if world is None:
            p.error("--search needs the cluster: --world N or --nodes N --gpus-per-node G")
        if not 0 < args.headroom <= 1 or args.top < 1:
            p.error("--headroom must be in (0, 1] and --top >= 1")
        result = search(cfg, world, gpu, mfu=args.mfu, gpus_per_node=args.gpus_per_node or 8,
                        headroom=args.headroom, top=args.top)
        print(json.dumps(result, indent=2) if args.json else format_search(result))
        return 0
    plan = make_plan(cfg, world=world, gpu=gpu, mfu=args.mfu, tokens=args.tokens, gpus_per_node=args.gpus_per_node)
    print(json.dumps(plan, indent=2) if args.json else format_plan(plan))
    return 0


def main(argv=None) -> int:
    """The tool: 0, or 2 after one line on stderr for an error the user can fix (megaloop.errors.run_cli)."""
    from megaloop.errors import run_cli

    return run_cli(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
