"""The evaluation tables as a person reads them (stdout), as CSV / JSON files and as a PNG plot
(matplotlib, when installed) for tools/eval_loops.py. Files are written to a temporary name and renamed
into place, so an interrupted evaluation leaves no half-written table."""
from __future__ import annotations

import csv
import json
import os
from pathlib import Path


def _replace_atomically(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_csv(path: Path, fieldnames, rows) -> None:
    def write(tmp):
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fieldnames)
            w.writeheader()
            w.writerows(rows)
    _replace_atomically(Path(path), write)
    print(f"wrote {path}")


TEXT_COLUMNS = ["mode", "threshold", "loops", "avg_loops", "nll", "ppl"]
TASK_COLUMNS = TEXT_COLUMNS + ["exact_match_sequence", "exact_match_position"]


def print_text_table(lm, rows, n_tok, n_batches):
    print(f"{lm.kind} model trained with R={lm.train_loops}; {n_tok} tokens in {n_batches} batches")
    print(f"{'mode':>8} {'threshold':>9} {'loops':>5} {'avg_loops':>9} {'nll':>8} {'ppl':>10}")
    for row in rows:
        print(f"{row['mode']:>8} {row['threshold']:>9} {row['loops']:>5} {row['avg_loops']:>9.2f} "
              f"{row['nll']:>8.4f} {row['ppl']:>10.3f}")


def print_task_tables(lm, spec, num_examples, rows, grid):
    name, params, seed = spec
    print(f"{lm.kind} model trained with R={lm.train_loops}; task {name} {params}, {num_examples} examples "
          f"(seed {seed}); exact match per sequence (seq_acc) and per answer position (pos_acc)")
    print(f"{'mode':>8} {'threshold':>9} {'loops':>5} {'avg_loops':>9} {'nll':>8} {'seq_acc':>8} {'pos_acc':>8}")
    for row in rows:
        print(f"{row['mode']:>8} {row['threshold']:>9} {row['loops']:>5} {row['avg_loops']:>9.2f} "
              f"{row['nll']:>8.4f} {row['exact_match_sequence']:>8.3f} {row['exact_match_position']:>8.3f}")
    if grid is None:
        return
    print(f"length extrapolation (trained at length {grid['train_length']}): seq_acc / pos_acc")
    print(f"{'length':>6} " + " ".join(f"{'R=' + str(r):>13}" for r in grid["loops"]))
    for length in grid["lengths"]:
        cells = [c for c in grid["cells"] if c["length"] == length]
        print(f"{length:>6} " + " ".join(f"{c['exact_match_sequence']:>6.3f}/{c['exact_match_position']:.3f}"
                                         for c in cells))


def plot_text(out: Path, rows, train_loops):
    """OUT/eval_loops.png: perplexity against loops, each exit at its average loops."""
    plt = _pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    fixed = [r for r in rows if r["mode"] == "fixed"]
    ax.plot([r["loops"] for r in fixed], [r["ppl"] for r in fixed], "o-", label="fixed loops")
    for r in rows:
        if r["mode"] != "fixed":
            ax.plot([r["avg_loops"]], [r["ppl"]], "s", label=f"{r['mode']} {r['threshold']} (avg loops)")
    ax.axvline(train_loops, color="gray", ls="--", lw=1, label="trained R")
    ax.set_xlabel("loops at test time")
    ax.set_ylabel("validation perplexity")
    _save_figure(plt, fig, ax, out / "eval_loops.png")


def write_task_outputs(out: Path, rows, grid, train_loops):
    """OUT/eval_loops.csv (the text columns plus the accuracies), OUT/eval_lengths.csv (the length grid) and
    OUT/eval_loops.png (accuracy against loops, one line per length)."""
    write_csv(out / "eval_loops.csv", TASK_COLUMNS, rows)
    if grid is not None:
        write_csv(out / "eval_lengths.csv", ["length", "loops", "nll", "exact_match_sequence",
                                             "exact_match_position"], grid["cells"])
    plt = _pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    fixed = [r for r in rows if r["mode"] == "fixed"]
    if grid is None:
        ax.plot([r["loops"] for r in fixed], [r["exact_match_sequence"] for r in fixed], "o-", label="fixed loops")
    else:
        for length in grid["lengths"]:
            cells = [c for c in grid["cells"] if c["length"] == length]
            ax.plot([c["loops"] for c in cells], [c["exact_match_sequence"] for c in cells], "o-",
                    label=f"length {length}" + (" (trained)" if length == grid["train_length"] else ""))
    for r in rows:
        if r["mode"] != "fixed":
            ax.plot([r["avg_loops"]], [r["exact_match_sequence"]], "s", label=f"{r['mode']} {r['threshold']} (avg loops)")
    ax.axvline(train_loops, color="gray", ls="--", lw=1, label="trained R")
    ax.set_xlabel("loops at test time")
    ax.set_ylabel("exact match (per sequence)")
    ax.set_ylim(-0.02, 1.02)
    _save_figure(plt, fig, ax, out / "eval_loops.png")


def _save_figure(plt, fig, ax, path: Path):
    ax.legend()
    fig.tight_layout()
    _replace_atomically(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)
    print(f"wrote {path}")


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: skipping the PNG plot (pip install matplotlib to get it)")
        return None
    return plt


def write_json(path, payload):
    path = Path(path)
    if path.parent != Path(""):
        path.parent.mkdir(parents=True, exist_ok=True)
    _replace_atomically(path, lambda tmp: tmp.write_text(json.dumps(payload, indent=1) + "\n"))
    print(f"wrote {path}")
