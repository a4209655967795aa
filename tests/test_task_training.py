"""Synthetic tasks through the real training path (data.task): batches with answer-only labels, exact-match
accuracy in validation, and one-line refusals of a task that does not fit the config."""
import os

from test_train_support import REPO, metrics, run_ranks, tiny_config, write_config


def _cfg(tmp_path, name, data, **train):
    t = {"steps": 8, "log_interval": 4, "eval_interval": 4, "eval_iters": 2, "lr": 3e-3, "warmup_steps": 0}
    t.update(train)
    cfg = tiny_config("unused", str(tmp_path / name), train=t, data=data, model={"vocab_size": 16})
    cfg["data"].pop("data_path")
    cfg["data"].pop("split")
    return write_config(str(tmp_path / f"{name}.yaml"), cfg)


def test_task_trains_and_reports_exact_match(tmp_path):
    path = _cfg(tmp_path, "parity", {"task": "parity", "task_params": {"length": 12}, "seq_len": 13})
    (rc, out), = run_ranks(1, ["--config", path], timeout=180)
    assert rc == 0, out[-3000:]
    rows = [r for r in metrics(str(tmp_path / "parity")) if "valid_loss" in r]
    assert [r["step"] for r in rows] == [4, 8]
    for r in rows:
        assert 0.0 <= r["exact_match_sequence"] <= 1.0 and 0.0 <= r["exact_match_position"] <= 1.0
    assert "exact match position" in out


def test_task_that_does_not_fit_is_one_line(tmp_path):
    bad_len = _cfg(tmp_path, "badlen", {"task": "s5", "task_params": {"length": 8}, "seq_len": 32})
    (rc, out), = run_ranks(1, ["--config", bad_len], timeout=120)
    assert rc == 2 and "data.seq_len=9" in out and "Traceback" not in out, out[-2000:]
    bad_param = _cfg(tmp_path, "badparam", {"task": "parity", "task_params": {"lenght": 8}, "seq_len": 9})
    (rc, out), = run_ranks(1, ["--config", bad_param], timeout=120)
    assert rc == 2 and "lenght" in out and "Traceback" not in out, out[-2000:]
