"""tools/eval_loops.py on task runs (data.task): exact-match accuracy per sequence / per position next to the
loss at each test-time R, equal to an independent computation from the model's logits and to the trainer's
own validation; the length-extrapolation grid's cells; a text (non-task) evaluation keeps its outputs."""
import csv
import json
import math

import pytest
import torch
import torch.nn.functional as F

from megaloop.checkpoint import load_model, save_plain_checkpoint
from megaloop.tasks import build_task
from test_train_support import metrics, run_ranks, tiny_config, write_config
from tools import eval_loops

LENGTH, SEED, N = 4, 7, 16  # parity at length 4; the trainer validates on 2 x 8 examples of seed SEED + 1


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("eval_tasks")
    out = tmp / "parity"
    cfg = tiny_config("unused", str(out), model={"vocab_size": 8, "max_seq_len": 8},
                      data={"task": "parity", "task_params": {"length": LENGTH}, "seq_len": LENGTH + 1},
                      train={"steps": 12, "seed": SEED, "log_interval": 6, "eval_interval": 12, "eval_iters": 2,
                             "micro_batch_size": 8, "lr": 1e-2, "warmup_steps": 0})
    cfg["data"].pop("data_path")
    cfg["data"].pop("split")
    (rc, log), = run_ranks(1, ["--config", write_config(str(tmp / "parity.yaml"), cfg)], timeout=180)
    assert rc == 0, log[-3000:]
    return tmp, out


def reference(model, task, loops, n=N):
    """(per-sequence, per-position exact match, mean NLL per answer) from the model's logits, written out."""
    model.cfg.max_seq_len = max(model.cfg.max_seq_len, task.seq_len)  # (a length guard only)
    seq_right, pos_right, positions, nll = 0, 0, 0, 0.0
    for i in range(n):
        tokens, labels = task.example(i)
        with torch.no_grad():
            logits = model(tokens[None], loops=loops).logits[0]
        answer = labels != -100
        right = logits.argmax(-1)[answer] == labels[answer]
        seq_right += int(bool(right.all()))
        pos_right += int(right.sum())
        positions += int(answer.sum())
        nll -= float(F.log_softmax(logits[answer].double(), -1).gather(-1, labels[answer][:, None]).sum())
    return seq_right / n, pos_right / positions, nll / positions


def _eval(tmp, out, *extra):
    js = tmp / f"eval{len(extra)}.json"
    rc = eval_loops.main(["--model", str(out), "--num-examples", str(N), "--batch-size", "5", "--loops", "1,2,3",
                          "--exits", "kl:1e-3", "--out-dir", str(tmp / "ev"), "--json", str(js), *extra])
    assert rc == 0
    return json.loads(js.read_text())


def test_accuracy_matches_logits_and_the_trainers_validation(run):
    tmp, out = run
    res = _eval(tmp, out)
    assert res["task"] == "parity" and res["task_params"] == {"length": LENGTH} and res["task_seed"] == SEED + 1
    model, _ = load_model(out)
    task = build_task("parity", length=LENGTH, seed=SEED + 1)
    fixed = {r["loops"]: r for r in res["rows"] if r["mode"] == "fixed"}
    assert sorted(fixed) == [1, 2, 3] and [r["mode"] for r in res["rows"]][-1] == "kl"
    for r, row in fixed.items():
        seq, pos, nll = reference(model, task, r)
        assert 0.0 <= row["exact_match_sequence"] <= 1.0 and 0.0 <= row["exact_match_position"] <= 1.0
        assert row["exact_match_sequence"] == seq and row["exact_match_position"] == pos, (r, row, seq, pos)
        assert math.isclose(row["nll"], nll, rel_tol=1e-5) and row["avg_loops"] == r
    # The trainer validated the final weights on the same 16 examples (seed + 1) at R = model.loops = 2.
    valid = [m for m in metrics(str(out)) if "valid_loss" in m][-1]
    assert valid["step"] == 12
    assert valid["exact_match_sequence"] == fixed[2]["exact_match_sequence"]
    assert valid["exact_match_position"] == fixed[2]["exact_match_position"]
    assert math.isclose(valid["valid_loss"], fixed[2]["nll"], rel_tol=1e-5)
    # the CSV carries the text columns plus the accuracies
    with open(tmp / "ev" / "eval_loops.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["mode", "threshold", "loops", "avg_loops", "nll", "ppl", "exact_match_sequence",
                             "exact_match_position"]
    assert float(rows[1]["exact_match_position"]) == fixed[2]["exact_match_position"]


def test_length_grid_cells(run):
    tmp, out = run
    grid = _eval(tmp, out)["length_grid"]
    assert grid["train_length"] == LENGTH and grid["lengths"] == [4, 8, 16] and grid["loops"] == [1, 2, 3]
    assert [(c["length"], c["loops"]) for c in grid["cells"]] == [(n, r) for n in (4, 8, 16) for r in (1, 2, 3)]
    model, _ = load_model(out)
    cell = next(c for c in grid["cells"] if c["length"] == 8 and c["loops"] == 3)
    seq, pos, nll = reference(model, build_task("parity", length=8, seed=SEED + 1), 3)
    # (9 tokens: beyond the model's max_seq_len of 8, evaluated with the guard raised)
    assert (cell["exact_match_sequence"], cell["exact_match_position"]) == (seq, pos)
    assert math.isclose(cell["nll"], nll, rel_tol=1e-5)
    custom = _eval(tmp, out, "--lengths", "6,4", "--task-seed", "3")["length_grid"]
    assert custom["lengths"] == [4, 6] and len(custom["cells"]) == 6
    seq, pos, _ = reference(load_model(out)[0], build_task("parity", length=6, seed=3), 1)
    assert (custom["cells"][3]["exact_match_sequence"], custom["cells"][3]["exact_match_position"]) == (seq, pos)
    with open(tmp / "ev" / "eval_lengths.csv") as f:
        assert len(list(csv.DictReader(f))) == 6


def test_task_without_length_and_bad_flags(run, tmp_path, capsys):
    tmp, out = run
    res = _eval(tmp, out, "--task", "z5", "--task-params", '{"length": 4}')
    assert res["task"] == "z5" and [c["length"] for c in res["length_grid"]["cells"]][::3] == [4, 8, 16]
    assert eval_loops.main(["--model", str(out), "--task", "sudoku", "--lengths", "4", "--out-dir", str(tmp_path)]) == 2
    assert "no length parameter" in capsys.readouterr().err
    assert eval_loops.main(["--model", str(out), "--task", "parity", "--text", "x", "--out-dir", str(tmp_path)]) == 2
    assert "drop --data / --text" in capsys.readouterr().err


def test_text_evaluation_is_unchanged(tmp_path, capsys):
    """A non-task model on --text: the same columns, files and numbers as before (independent NLL here)."""
    from export_support import perturbed_model, tiny_config as tiny_yaml
    cfg = tiny_yaml("lt")
    model = perturbed_model(cfg)
    ckpt = save_plain_checkpoint(model, cfg, tmp_path / "run" / "model.pt")
    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 8)
    js = tmp_path / "e.json"
    assert eval_loops.main(["--model", str(ckpt), "--text", str(text), "--seq-len", "16", "--max-windows", "4",
                            "--loops", "1,3", "--exits", "--out-dir", str(tmp_path / "ev"), "--json", str(js)]) == 0
    with open(tmp_path / "ev" / "eval_loops.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["mode", "threshold", "loops", "avg_loops", "nll", "ppl"]
    assert not (tmp_path / "ev" / "eval_lengths.csv").exists()
    ids = torch.tensor(list(text.read_bytes()[:4 * 16 + 1]))
    x, y = ids[:-1].view(4, 16), ids[1:].view(4, 16)
    for row, r in zip(rows, (1, 3)):
        with torch.no_grad():
            nll = F.cross_entropy(model(x, loops=r).logits.flatten(0, 1), y.flatten()).item()
        assert math.isclose(float(row["nll"]), nll, rel_tol=1e-5)
    assert [r["loops"] for r in json.loads(js.read_text())["rows"]] == [1, 3]
    assert "mode threshold loops avg_loops      nll        ppl" in capsys.readouterr().out
    # a bidirectional model has no next-token perplexity: refused in one line
    nc = tiny_yaml("lt", ["model.causal=false", "data.task=sudoku"])
    nc_ckpt = save_plain_checkpoint(perturbed_model(nc), nc, tmp_path / "nc" / "model.pt")
    assert eval_loops.main(["--model", str(nc_ckpt), "--text", str(text), "--out-dir", str(tmp_path / "x")]) == 2
    assert "model.causal=false" in capsys.readouterr().err
