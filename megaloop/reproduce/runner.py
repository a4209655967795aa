"""What every claim shares: train variants through `pretrain_looped.py` (one rank, a subprocess each), read
their metrics.jsonl, build the demo corpus once, evaluate task accuracy with megaloop's own code, and write
summary.csv / figure.png / result.json.

A claim module (megaloop/reproduce/<claim>.py) builds a list of `Variant`s (name + config dict), calls
`train_variants`, measures, and returns a `ClaimResult` (rows for summary.csv, a figure-drawing function,
the verdict line computed from the measurements and whether the claim held).
"""
from __future__ import annotations

import copy
import csv
import json
import math
import os
import socket
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import yaml

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXIT_NONFINITE = 3  # megaloop.training.cli: training stopped on a non-finite loss


@dataclass
class Context:
    """Where a claim writes (out_dir/<claim>/), how big it runs (quick), how many trainings at once."""

    out_dir: str
    quick: bool = False
    jobs: int = 1
    reuse: bool = False  # keep a finished run whose config is unchanged instead of training it again
    train_wall_s: float = 0.0  # the variants' training wall times, summed (reused runs: as first measured)
    reused: int = 0  # variants read back instead of trained
    codes: Counter = field(default_factory=Counter)  # the megaloop commit that trained each variant: count
    python: str = sys.executable
    verbose: bool = True
    scale: str = "cpu"  # --scale gpu: each claim's GPU-sized settings (~15 minutes of one H100), on the accelerator
    seeds: Tuple[int, ...] = (1234,)  # --seeds: the claim runs once per seed (megaloop/reproduce/seeds.py)
    seed: int = 1234  # the seed running now: every variant's train.seed

    def runs_dir(self, claim_dir: str) -> str:
        """claim_dir/runs (one seed) or claim_dir/runs/seed<N> (several): one folder per variant under it."""
        runs = os.path.join(claim_dir, "runs")
        return runs if len(self.seeds) == 1 else os.path.join(runs, f"seed{self.seed}")

    def claim_dir(self, claim: str) -> str:
        path = os.path.join(os.path.abspath(self.out_dir), claim)
        os.makedirs(path, exist_ok=True)
        return path

    def log(self, text: str) -> None:
        if self.verbose:
            print(f"[reproduce {time.strftime('%H:%M:%S')}] {text}", flush=True)


@dataclass
class Variant:
    name: str
    config: dict  # a full pretrain_looped.py config (sections model, loop, data, train, parallel)


@dataclass
class RunResult:
    name: str
    run_dir: str
    returncode: int
    wall_s: float
    rows: List[dict] = field(default_factory=list)
    code: str = "unknown"  # the megaloop commit that trained it (short sha, "+dirty" with uncommitted changes)

    @property
    def diverged(self) -> bool:
        return self.returncode == EXIT_NONFINITE

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    def train_losses(self) -> Dict[int, float]:
        return {r["step"]: r["loss"] for r in self.rows if "loss" in r}

    def grad_norms(self) -> Dict[int, float]:
        return {r["step"]: r["grad_norm"] for r in self.rows if "loss" in r and r.get("grad_norm") is not None}

    def per_loop(self) -> Dict[int, dict]:
        """step -> {residual_norm: [per loop], state_norm: [...], state_delta: [...], relative_residual: [...]}"""
        return {r["step"]: r["per_loop"] for r in self.rows if "per_loop" in r}

    def last_per_loop(self) -> dict:
        pl = self.per_loop()
        return pl[max(pl)] if pl else {}

    def last_diagnostics(self) -> dict:
        """The last `train.diag_interval` row's fixed-point and per-loop gradient diagnostics
        (megaloop/training/diagnostics.py: loop_map_spectral_norm, input_dependence, grad_norm[loop][group],
        ...), {} if the run took none."""
        rows = [r for r in self.rows if "diagnostics" in r]
        return rows[-1]["diagnostics"] if rows else {}

    def valid_rows(self) -> List[dict]:
        return [r for r in self.rows if "valid_loss" in r]

    def final_loss(self, fraction: float = 0.2) -> float:
        """Mean training loss over the last `fraction` of the logged steps (NaN if none, inf if diverged)."""
        losses = self.train_losses()
        if self.diverged:
            return float("inf")
        if not losses:
            return float("nan")
        steps = sorted(losses)
        tail = steps[-max(1, int(len(steps) * fraction)):]
        return sum(losses[s] for s in tail) / len(tail)

    def final_valid_loss(self) -> float:
        rows = self.valid_rows()
        if self.diverged:
            return float("inf")
        return rows[-1]["valid_loss"] if rows else float("nan")


@dataclass
class ClaimResult:
    rows: List[dict]  # summary.csv rows (the same keys in each)
    verdict: str  # one line, with the numbers
    held: bool
    draw: Callable  # draw(fig) -> None: fills a matplotlib figure (or subfigure)
    figsize: tuple = (10, 4)
    # the numbers the verdict compares, by name (the multi-seed verdict shows their mean ± spread)
    headline: Dict[str, float] = field(default_factory=dict)
    # filled by seeds.combine: headline values per seed, each seed's verdict, summary rows as mean ± spread
    per_seed: Dict[str, List[float]] = field(default_factory=dict)
    seed_verdicts: List[str] = field(default_factory=list)
    mean_rows: Optional[List[dict]] = None


def deep_update(base: dict, *updates: dict) -> dict:
    out = copy.deepcopy(base)
    for upd in updates:
        for key, value in (upd or {}).items():
            if isinstance(value, dict) and isinstance(out.get(key), dict) and key != "task_params":
                out[key] = deep_update(out[key], value)
            else:
                out[key] = copy.deepcopy(value)
    return out


def base_config(**sections) -> dict:
    """A one-rank CPU run: fp32, no TensorBoard, no intermediate checkpoints (the final one is saved)."""
    cfg = {
        "model": {"pad_vocab_multiple": 1, "n_prelude": 0, "n_coda": 0},
        "loop": {"sampling": "fixed"},
        "data": {},
        "train": {"seed": 1234, "grad_accum_steps": 1, "warmup_steps": 5, "lr_schedule": "cosine",
                  "precision": "fp32", "eval_interval": 0, "save_interval": 0, "tensorboard": False,
                  "weight_decay": 0.1, "grad_clip": 1.0},
        "parallel": {"pipeline_parallel": 1, "tensor_parallel": 1, "zero_stage": 0},
    }
    return deep_update(cfg, sections)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _read_metrics(run_dir: str) -> List[dict]:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _run_config(variant: Variant, run_dir: str) -> dict:
    return deep_update(variant.config, {"train": {"output_dir": run_dir}})


def _finished(variant: Variant, run_dir: str) -> Optional[RunResult]:
    """The finished run of `variant` in run_dir (same config, exit status recorded), or None."""
    try:
        with open(os.path.join(run_dir, "reproduce_config.yaml")) as f:
            same = yaml.safe_load(f) == _run_config(variant, run_dir)
        with open(os.path.join(run_dir, "status.json")) as f:
            status = json.load(f)
    except (OSError, ValueError):
        return None
    if not same or status.get("returncode") not in (0, EXIT_NONFINITE):
        return None
    return RunResult(variant.name, run_dir, status["returncode"], status["wall_s"], _read_metrics(run_dir),
                     code=status.get("code", "unknown"))


def code_version() -> str:
    """This checkout's commit (short sha, "+dirty" with uncommitted changes; "unknown" outside git): what a run
    was trained with. --reuse matches runs by config only, and a code change (the 2026-12-07 per-parameter
    init) changes what a config trains, so the docs say which code trained each claim's runs."""
    from megaloop.training.trackers import git_commit

    got = git_commit()
    if not got:
        return "unknown"
    return got["git_commit"][:7] + ("+dirty" if got["git_dirty"] else "")


def _start(ctx: Context, variant: Variant, claim_dir: str):
    run_dir = os.path.join(ctx.runs_dir(claim_dir), variant.name)
    if os.path.isdir(run_dir):  # train afresh: never resume a previous reproduction
        import shutil
        shutil.rmtree(run_dir)
    os.makedirs(run_dir)
    cfg = _run_config(variant, run_dir)
    cfg_path = os.path.join(run_dir, "reproduce_config.yaml")
    with open(cfg_path, "w") as f:
        yaml.safe_dump(cfg, f, sort_keys=False)
    env = dict(os.environ)
    env.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_SIZE="1", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(_free_port()), PYTHONPATH=REPO + os.pathsep + env.get("PYTHONPATH", ""))
    if ctx.scale == "cpu":  # (--scale gpu: DeepSpeed picks the machine's accelerator)
        env.update(OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    env.pop("MEGALOOP_FAULT", None)
    log = open(os.path.join(run_dir, "train.log"), "w")
    cmd = [ctx.python, os.path.join(REPO, "pretrain_looped.py"), "--config", cfg_path, "--no-auto-resume"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    return proc, log, run_dir, time.time()


def train_variants(ctx: Context, claim_dir: str, variants: List[Variant]) -> Dict[str, RunResult]:
    """Train every variant (ctx.jobs at a time). A run that stops on a non-finite loss is kept (diverged);
    any other failure raises with the tail of its log. With ctx.reuse, a finished run of the same config
    under claim_dir/runs/<name> is read back instead of trained again. Every variant trains with train.seed =
    ctx.seed (seeds.seeded); with several --seeds its folder is claim_dir/runs/seed<N>/<name>."""
    from megaloop.reproduce.seeds import seeded

    variants = [Variant(v.name, seeded(v.config, ctx.seed)) for v in variants]
    pending, running, results = list(variants), [], {}
    code = code_version()
    if ctx.reuse:
        for v in variants:
            done = _finished(v, os.path.join(ctx.runs_dir(claim_dir), v.name))
            if done is not None:
                ctx.log(f"{v.name}: reusing the finished run in {done.run_dir}")
                results[v.name] = done
                ctx.codes[done.code] += 1
                ctx.train_wall_s += done.wall_s
                ctx.reused += 1
                pending.remove(v)
    while pending or running:
        while pending and len(running) < max(1, ctx.jobs):
            v = pending.pop(0)
            ctx.log(f"training {v.name}" + (f" (seed {ctx.seed})" if len(ctx.seeds) > 1 else ""))
            running.append((v, *_start(ctx, v, claim_dir)))
        still = []
        for v, proc, log, run_dir, t0 in running:
            if proc.poll() is None:
                still.append((v, proc, log, run_dir, t0))
                continue
            log.close()
            res = RunResult(v.name, run_dir, proc.returncode, time.time() - t0, _read_metrics(run_dir), code=code)
            with open(os.path.join(run_dir, "status.json"), "w") as f:
                json.dump({"returncode": res.returncode, "wall_s": round(res.wall_s, 1), "code": code}, f)
            if not (res.ok or res.diverged):
                with open(os.path.join(run_dir, "train.log")) as f:
                    tail = f.read()[-2500:]
                raise RuntimeError(f"training variant {v.name!r} failed (exit {proc.returncode}); "
                                   f"log {run_dir}/train.log ends:\n{tail}")
            ctx.log(f"{v.name}: {'diverged (non-finite loss)' if res.diverged else 'done'} in {res.wall_s:.1f}s")
            ctx.train_wall_s += res.wall_s
            ctx.codes[code] += 1
            results[v.name] = res
        running = still
        if running:
            time.sleep(0.2)
    return {v.name: results[v.name] for v in variants}


# ------------------------------------------------------------------------------------------------
# The demo corpus (tools/make_demo_corpus.py -> train_tokenizer.py -> preprocess_data.py), built once.

def demo_corpus(ctx: Context) -> dict:
    """{"data_path": [...], "tokenizer_type": "sentencepiece", "tokenizer_model": ..., "vocab_size": ...} of the
    demo corpus under OUT/_data (the Python standard library's sources, no download), made on first use."""
    max_bytes, vocab = ((1_000_000, 512) if ctx.quick else (16_000_000, 4096) if ctx.scale == "gpu"
                        else (4_000_000, 1024))
    data_dir = os.path.join(os.path.abspath(ctx.out_dir), "_data", f"demo_{max_bytes // 1000}k_v{vocab}")
    prefix = os.path.join(data_dir, "demo")
    spm = os.path.join(data_dir, "spm.model")
    if not os.path.isfile(prefix + "_text_document.idx"):
        os.makedirs(data_dir, exist_ok=True)
        ctx.log(f"building the demo corpus in {data_dir}")
        tools = os.path.join(REPO, "tools")
        jsonl = os.path.join(data_dir, "demo.jsonl")
        steps = [
            ["make_demo_corpus.py", "--output", jsonl, "--max-bytes", str(max_bytes)],
            ["train_tokenizer.py", "--input", jsonl, "--model-prefix", spm[:-len(".model")], "--vocab-size",
             str(vocab), "--model-type", "bpe", "--num-threads", "1"],
            ["preprocess_data.py", "--input", jsonl, "--tokenizer-type", "sentencepiece", "--tokenizer-model", spm,
             "--append-eod", "--output-prefix", prefix, "--workers", "1", "--quiet"],
        ]
        for step in steps:
            out = subprocess.run([ctx.python, os.path.join(tools, step[0]), *step[1:]], cwd=REPO,
                                 capture_output=True, text=True, env={**os.environ, "PYTHONPATH": REPO})
            if out.returncode != 0:
                raise RuntimeError(f"{step[0]} failed: {(out.stdout + out.stderr)[-1500:]}")
    return {"data_path": [prefix + "_text_document"], "tokenizer_type": "sentencepiece", "tokenizer_model": spm,
            "vocab_size": vocab, "split": "95,5,0"}


# ------------------------------------------------------------------------------------------------
# Evaluation with megaloop's own code.

def load_trained(run: RunResult):
    """The trained LoopedLM of a run (its final checkpoint), in eval mode; None if it saved none."""
    from megaloop.checkpoint import load_model

    if not os.path.isdir(os.path.join(run.run_dir, "checkpoints")):
        return None
    model, _ = load_model(run.run_dir)
    return model.eval()


def task_accuracy(model, task, loops: int, num: int = 256, batch: int = 64, offset: int = 0,
                  min_position: int = 0) -> tuple:
    """(per-sequence, per-position) exact-match accuracy of `model` at `loops` on `num` examples of `task`
    (megaloop.tasks exact_match_counts), scoring answers at token positions >= min_position only (position 1
    of a prefix-composition target is a copy of the input); (nan, nan) without a model."""
    import torch

    from megaloop.tasks import exact_match_counts

    if model is None:
        return float("nan"), float("nan")
    sr = sn = pr = pn = 0
    with torch.no_grad():
        for start in range(0, num, batch):
            idx = range(offset + start, offset + min(num, start + batch))
            pairs = [task.example(i) for i in idx]
            tokens = torch.stack([p[0] for p in pairs])
            labels = torch.stack([p[1] for p in pairs])
            labels[:, :min_position] = -100
            torch.manual_seed(0)  # a fixed draw for a noise initial state
            logits = model(tokens, loops=loops).logits
            a, b, c, d = exact_match_counts(logits, labels)
            sr, sn, pr, pn = sr + a, sn + b, pr + c, pn + d
    return (sr / sn if sn else float("nan")), (pr / pn if pn else float("nan"))


def task_accuracy_exit(model, task, loops: int, exit: str, threshold: float, num: int = 256,
                       batch: int = 64) -> tuple:
    """(per-position accuracy, average loops used at the answer positions) of `model` run with at most
    `loops` loops and the exit strategy `exit` ("kl" or "q_exit") at `threshold` (LoopedLM.forward's exit)."""
    import torch

    from megaloop.tasks import exact_match_counts

    right = total = 0
    loop_sum = 0.0
    with torch.no_grad():
        for start in range(0, num, batch):
            pairs = [task.example(i) for i in range(start, min(num, start + batch))]
            tokens = torch.stack([p[0] for p in pairs])
            labels = torch.stack([p[1] for p in pairs])
            torch.manual_seed(0)
            out = model(tokens, loops=loops, exit=exit, exit_threshold=threshold)
            _, _, c, d = exact_match_counts(out.logits, labels)
            right, total = right + c, total + d
            loop_sum += float(out.exit_loops[labels >= 0].float().sum())
    return right / total, loop_sum / total


def resolved_config(config: dict):
    """The validated Config a variant's config dict trains with (recipe applied), without an output folder."""
    from megaloop.config.loading import config_from_dict

    return config_from_dict(deep_update(config, {"train": {"output_dir": os.devnull}}))


def param_count(config: dict) -> int:
    """Parameters of the model a config builds (megaloop.model.build_model), without training it."""
    from megaloop.model import build_model

    return build_model(resolved_config(config)).num_params()


# ------------------------------------------------------------------------------------------------
# Outputs.

def fmt(x, digits: int = 3) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        if math.isnan(x):
            return "nan"
        if math.isinf(x):
            return "diverged" if x > 0 else "-inf"
        return f"{x:.{digits}g}" if abs(x) < 1e4 else f"{x:.3e}"
    return str(x)


def write_outputs(ctx: Context, claim: str, result: ClaimResult, command: str, wall_s: float) -> dict:
    """summary.csv, figure.png and result.json under OUT/<claim>/; returns the result record."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    d = ctx.claim_dir(claim)
    columns = list(result.rows[0].keys())
    _write_csv(os.path.join(d, "summary.csv"), columns, result.rows)
    mean_path = os.path.join(d, "summary_mean.csv")
    if result.mean_rows:  # several seeds: one row per variant, mean ± spread where the seeds differ
        _write_csv(mean_path, list(result.mean_rows[0]), result.mean_rows)
    elif os.path.isfile(mean_path):
        os.remove(mean_path)  # a stale table of an earlier multi-seed run
    several = len(ctx.seeds) > 1
    fig = plt.figure(figsize=result.figsize, layout="constrained" if several else None)
    result.draw(fig)
    fig.suptitle(f"{claim}{' (--quick)' if ctx.quick else ''}: {'held' if result.held else 'did not hold'}"
                 + (f" for every seed ({', '.join(map(str, ctx.seeds))})" if several and result.held else ""),
                 fontsize=10)
    if not several:
        fig.tight_layout()
    fig.savefig(os.path.join(d, "figure.png"), dpi=80 if not several else 60)  # (docs copy figures up to 200 KB)
    plt.close(fig)
    record = {"claim": claim, "command": command, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "quick": ctx.quick, "verdict": result.verdict, "held": result.held, "wall_s": round(wall_s, 1),
              "train_wall_s": round(ctx.train_wall_s, 1), "reused_runs": ctx.reused, "code": dict(ctx.codes),
              "load_avg_1m": round(os.getloadavg()[0], 2), "columns": columns, "seeds": list(ctx.seeds),
              "seed_verdicts": result.seed_verdicts, "headline": result.per_seed,
              "mean_columns": list(result.mean_rows[0]) if result.mean_rows else None}
    with open(os.path.join(d, "result.json"), "w") as f:
        json.dump(record, f, indent=1)
    return record


def _write_csv(path: str, columns: List[str], rows: List[dict]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns)
        w.writeheader()
        for row in rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})


def read_summary(path: str) -> List[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))
