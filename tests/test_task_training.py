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


# ------------------------------------------------------------------------------------------------
# The task stream under other layouts: the same examples in the same order on any TP / PP layout, DP
# ranks reading disjoint slices of it (DP 2 = one rank accumulating 2 micro-batches), and a resumed run
# continuing it exactly; validation's exact-match accuracy is the same on every layout (PP included).

import math  # noqa: E402

import pytest  # noqa: E402

from test_train_support import assert_ok, train_rows  # noqa: E402

PARITY = {"task": "parity", "task_params": {"length": 12}, "seq_len": 13}


def _layout_cfg(tmp_path, name, parallel, gas=2, **train):
    # validation at two R, and with the KL exit where the layout allows it (PP 1)
    t = {"steps": 6, "grad_accum_steps": gas, "log_interval": 1, "eval_interval": 3, "eval_iters": 2,
         "save_interval": 3, "lr": 3e-3, "warmup_steps": 0, "eval_loops": [1, 2],
         "eval_exits": [] if parallel.get("pipeline_parallel", 1) > 1 else ["kl:0.01"]}
    t.update(train)
    cfg = tiny_config("unused", str(tmp_path / name), train=t, data=dict(PARITY), parallel=parallel,
                      model={"vocab_size": 16, "pad_vocab_multiple": 8, "n_prelude": 1, "n_coda": 1})
    cfg["data"].pop("data_path")
    cfg["data"].pop("split")
    return write_config(str(tmp_path / f"{name}.yaml"), cfg)


def _valid(out):
    return {(r["step"], r["R"], r.get("exit")): r for r in metrics(out) if "valid_loss" in r}


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("task_layouts")
    assert_ok(run_ranks(1, ["--config", _layout_cfg(tmp, "ref", {})], timeout=180))
    return tmp, str(tmp / "ref")


def _same_losses(ref_out, out, steps):
    ref, got = train_rows(ref_out), train_rows(out)
    assert sorted(got) == steps
    for s in steps:
        assert math.isclose(got[s]["loss"], ref[s]["loss"], rel_tol=1e-5), (s, got[s]["loss"], ref[s]["loss"])


@pytest.mark.parametrize("name,parallel", [("pp2", {"pipeline_parallel": 2}), ("tp2", {"tensor_parallel": 2})])
def test_task_stream_is_the_same_under_tp_and_pp(one_rank, name, parallel):
    tmp, ref_out = one_rank
    assert_ok(run_ranks(2, ["--config", _layout_cfg(tmp, name, parallel)], timeout=180))
    out = str(tmp / name)
    _same_losses(ref_out, out, [1, 2, 3, 4, 5, 6])
    ref, got = _valid(ref_out), _valid(out)
    exits = [] if name == "pp2" else [(2, "kl:0.01")]
    assert sorted(got, key=str) == sorted([(s, r, None) for s in (3, 6) for r in (1, 2)]
                                          + [(s, r, e) for s in (3, 6) for r, e in exits], key=str)
    for key in got:  # validation at each R and exit: loss, exact match (PP counts on its last stage), loops used
        assert math.isclose(got[key]["valid_loss"], ref[key]["valid_loss"], rel_tol=1e-5), key
        for k in ("exact_match_sequence", "exact_match_position"):
            assert got[key][k] == ref[key][k], (name, key, k, got[key][k], ref[key][k])
        if key[2] is not None:
            assert got[key]["avg_loops"] == pytest.approx(ref[key]["avg_loops"], rel=1e-6), (name, key)


def test_task_stream_sharded_by_dp_and_resumed_exactly(one_rank):
    """Resume the one-rank run's step-3 checkpoint on DP 2 (grad_accum 2 -> 1, the same global batch): the
    two ranks read the two halves of each global batch, so steps 4-6 equal the uninterrupted run's."""
    tmp, ref_out = one_rank
    load = os.path.join(ref_out, "checkpoints", "step_00000003")
    assert_ok(run_ranks(2, ["--config", _layout_cfg(tmp, "dp2", {}, gas=1, load=load)], timeout=180))
    _same_losses(ref_out, str(tmp / "dp2"), [4, 5, 6])
