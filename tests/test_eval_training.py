"""Evaluation during training (megaloop/training/evaluation.py): every named validation set of
data.valid_data_path at each train.eval_loops R and with each train.eval_exits exit, one record per (set, R)
naming both, equal to the loss computed independently from the final checkpoint; data.test_data_path's sets
once after the last step; train.harness_interval's lm-eval records (a local task) equal the perplexity of the
final weights at each R; an int eval_loops (and a saved config holding one) still reads as one R."""
import importlib.util
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from test_eval_harness import TASK, reference_perplexity, write_tiny_task
from test_train_support import make_byte_dataset, metrics, run_ranks, tiny_config, write_config

STEPS, ITERS, LOOPS, EXIT = 4, 2, [1, 3], "kl:1e-3"


def _reversed_dataset(prefix, source):
    """Another corpus (the bytes of each document reversed), so the two sets' losses differ."""
    from megaloop.data.indexed_dataset import IndexedDataset, IndexedDatasetWriter
    src = IndexedDataset(source)
    with IndexedDatasetWriter(prefix, np.uint16) as w:
        for d in range(min(len(src), 40)):
            w.add_document(np.asarray(src.get_document(d))[::-1].tolist())
    return prefix


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("eval_training")
    a = make_byte_dataset(str(tmp / "a_text_document"), max_bytes=120_000)
    b = _reversed_dataset(str(tmp / "b_text_document"), a)
    out = tmp / "run"
    harness = {"harness_interval": STEPS, "harness_tasks": [TASK], "harness_include_path": write_tiny_task(tmp / "t")} \
        if importlib.util.find_spec("lm_eval") and importlib.util.find_spec("accelerate") else {}
    cfg = tiny_config(a, str(out), data={"split": "100,0,0", "valid_data_path": {"code": [a], "reversed": [b]},
                                         "test_data_path": [0.5, a, 0.5, b]},
                      train={"steps": STEPS, "eval_interval": 2, "eval_iters": ITERS, "eval_loops": LOOPS,
                             "eval_exits": [EXIT], "log_interval": 2, **harness})
    path = write_config(str(tmp / "run.yaml"), cfg)
    (rc, log), = run_ranks(1, ["--config", path], timeout=600, env={"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"})
    assert rc == 0, log[-3000:]
    return path, out, log


def test_every_set_at_every_R_and_exit_is_a_record(run):
    _, out, log = run
    rows = [r for r in metrics(str(out)) if "valid_set" in r]
    want = [(s, n, r, e) for s in (2, 4) for n in ("code", "reversed") for r, e in ((1, None), (3, None), (3, EXIT))]
    assert [(r["step"], r["valid_set"], r["R"], r.get("exit")) for r in rows] == want
    for r in rows:
        assert math.isfinite(r["valid_loss"]) and ("avg_loops" in r) == ("exit" in r)
        if "exit" in r:
            assert 1.0 <= r["avg_loops"] <= 3.0
    last = {(r["valid_set"], r["R"], r.get("exit")): r["valid_loss"] for r in rows if r["step"] == STEPS}
    assert last[("code", 1, None)] != last[("code", 3, None)] != last[("reversed", 3, None)]
    tests = [(r["step"], r["test_set"], r["R"], r.get("exit")) for r in metrics(str(out)) if "test_set" in r]
    assert tests == [(STEPS, "test", 1, None), (STEPS, "test", 3, None), (STEPS, "test", 3, EXIT)]
    assert f"step {STEPS} | validation reversed | R=1 loss " in log and f"| {EXIT} (R=3, avg loops " in log
    assert f"step {STEPS} | test test | R=1 loss " in log


def test_records_equal_the_final_checkpoints_loss(run):
    """The step-4 records against the saved weights on the same micro-batches (EvalBatches), written out."""
    from megaloop.checkpoint import load_model
    from megaloop.config import load_config
    from megaloop.training.data import EvalBatches, build_run_datasets, build_tokenizer_for, samples_needed
    path, out, _ = run
    cfg = load_config(path)
    _, valid, _ = build_run_datasets(cfg, *samples_needed(cfg, 1), build_tokenizer_for(cfg))
    model, _ = load_model(out)
    model.eval()
    rows = {(r["valid_set"], r["R"], r.get("exit")): r for r in metrics(str(out))
            if r.get("step") == STEPS and "valid_set" in r}
    for name in ("code", "reversed"):
        for r in LOOPS:
            nll, exit_nll, exit_loops, answers = 0.0, 0.0, 0.0, 0
            for (tokens, _), labels in EvalBatches(valid[name], cfg, 0, 1, ITERS, r):
                with torch.no_grad():
                    nll += F.cross_entropy(model(tokens, loops=r).logits.flatten(0, 1), labels.flatten()).item()
                    o = model(tokens, loops=r, exit="kl", exit_threshold=1e-3)
                exit_nll += F.cross_entropy(o.logits.flatten(0, 1), labels.flatten()).item()
                exit_loops += float(o.exit_loops.sum())
                answers += labels.numel()
            assert rows[(name, r, None)]["valid_loss"] == pytest.approx(nll / ITERS, rel=1e-5)
            if r == max(LOOPS):
                ex = rows[(name, r, EXIT)]
                assert ex["valid_loss"] == pytest.approx(exit_nll / ITERS, rel=1e-5)
                assert ex["avg_loops"] == pytest.approx(exit_loops / answers, rel=1e-6)


def test_harness_interval_logs_lm_eval_per_R(run):
    """train.harness_interval=4: lm-eval on the step-4 weights (exported by the trainer) at each eval_loops R."""
    pytest.importorskip("lm_eval")
    pytest.importorskip("accelerate")
    from megaloop.checkpoint import load_model
    _, out, log = run
    rows = [r for r in metrics(str(out)) if "harness_task" in r]
    assert [(r["step"], r["harness_task"], r["R"]) for r in rows] == [(STEPS, TASK, 1), (STEPS, TASK, 3)]
    model, _ = load_model(out)
    for r in rows:
        assert r["perplexity"] == pytest.approx(reference_perplexity(model.eval(), r["R"]), rel=1e-4)
    assert f"step {STEPS} | lm-eval {TASK} | R=1 " in log and not list(out.glob(".harness-*"))


def test_an_int_eval_loops_is_one_R(tmp_path):
    from megaloop.config import load_config
    from megaloop.config.loading import config_from_dict
    from megaloop.training.evaluation import eval_loop_counts
    assert load_config(None, ["train.eval_loops=4"]).train.eval_loops == [4]
    saved = load_config(None, []).to_dict()
    saved["train"]["eval_loops"] = 6  # a config saved before eval_loops took a list
    assert eval_loop_counts(config_from_dict(saved)) == [6]
    assert eval_loop_counts(load_config(None, ["model.loops=3"])) == [3]
    assert eval_loop_counts(load_config(None, ["train.eval_loops=[8, 1, 8]"])) == [8, 1]
