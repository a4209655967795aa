"""Resuming a checkpoint on another TP x PP x DP x ZeRO layout (megaloop.checkpoint.relayout): weights,
AdamW state (fp32 master weights and moments), step, LR schedule and data position continue, so the
resumed steps' losses equal an uninterrupted run's; an unsupported change is refused before loading,
with both layouts named."""
import math
import os

import pytest
import torch

from test_train_support import assert_ok, make_byte_dataset, run_ranks, tiny_config, train_rows, write_config


def _cfg(data, out, steps, gas, parallel, **train):
    t = {"steps": steps, "grad_accum_steps": gas, "save_interval": 3, "log_interval": 1}
    t.update(train)
    return tiny_config(data, out, train=t, parallel=parallel)


def _run(tmp_path, name, world, cfg, timeout=150):
    results = run_ranks(world, ["--config", write_config(str(tmp_path / f"{name}.yaml"), cfg)], timeout=timeout)
    return results


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A TP2 x PP2 ZeRO 1 run of 6 steps (fixed R, fp32) saving at step 3: the reference losses and
    the checkpoint to resume from (saving does not change what is trained)."""
    tmp = tmp_path_factory.mktemp("relayout")
    data = make_byte_dataset(str(tmp / "data"))
    out = str(tmp / "tp2pp2")
    cfg = _cfg(data, out, 6, 2, {"tensor_parallel": 2, "pipeline_parallel": 2, "zero_stage": 1})
    assert_ok(_run(tmp, "tp2pp2", 4, cfg))
    return tmp, data, out


def _check_continues(source, name, world, gas, parallel):
    tmp, data, ref_out = source
    out = str(tmp / name)
    cfg = _cfg(data, out, 6, gas, parallel, load=os.path.join(ref_out, "checkpoints", "step_00000003"))
    results = _run(tmp, name, world, cfg)
    assert_ok(results)
    assert "layout: tensor_parallel x pipeline_parallel x data_parallel = 2 x 2 x 1, ZeRO 1 ->" in results[0][1]
    ref, got = train_rows(ref_out), train_rows(out)
    assert sorted(got) == [4, 5, 6]
    for s in (4, 5, 6):
        assert math.isclose(got[s]["loss"], ref[s]["loss"], rel_tol=1e-5), (s, got[s]["loss"], ref[s]["loss"])
        assert math.isclose(got[s]["lr"], ref[s]["lr"], rel_tol=1e-9)
    assert ref[6]["loss"] < ref[4]["loss"] + 1.0  # (a sanity bound: the run trains)


def test_resume_tp2pp2_as_one_rank(source):
    # TP1 x PP1 x DP1 (ZeRO 0: the plain torch optimizer takes the state), grad_accum as before.
    _check_continues(source, "tp1pp1", 1, 2, {"zero_stage": 0})


def test_resume_tp2pp2_as_dp2_zero1(source):
    # DP2 x ZeRO 1: grad_accum 2 -> 1 keeps the global batch of 8.
    _check_continues(source, "dp2z1", 2, 1, {"zero_stage": 1})


def test_resume_tp2pp2_as_tp2_dp2_zero2(source):
    # Onto TP 2 x DP 2 with ZeRO 2 (the real engine): each rank reads its TP slice of every parameter and
    # narrows it to its data-parallel partition of ZeRO 2's flat fp32 buffers; grad_accum 2 -> 1.
    _check_continues(source, "tp2dp2z2", 4, 1, {"tensor_parallel": 2, "zero_stage": 2})


def test_zero0_and_zero1_pipeline_checkpoints_read_to_the_same_state(source):
    """The ZeRO 0 optimizer state has no names (they are rebuilt from the config and the stage's layer
    range); ZeRO 1's has them: both readings of the same training must agree."""
    from megaloop.checkpoint.training_state import load_training_state
    tmp, data, ref_out = source
    out = str(tmp / "tp2pp2_z0")
    cfg = _cfg(data, out, 3, 2, {"tensor_parallel": 2, "pipeline_parallel": 2, "zero_stage": 0})
    assert_ok(_run(tmp, "tp2pp2_z0", 4, cfg))
    a = load_training_state(os.path.join(out, "checkpoints", "step_00000003"))
    b = load_training_state(os.path.join(ref_out, "checkpoints", "step_00000003"))
    assert a.adam_step == b.adam_step == 3
    assert sorted(a.weights) == sorted(b.weights)
    for k in a.weights:
        for x, y in ((a.weights, b.weights), (a.exp_avg, b.exp_avg), (a.exp_avg_sq, b.exp_avg_sq)):
            assert x[k].shape == y[k].shape, k
            torch.testing.assert_close(x[k], y[k], rtol=1e-4, atol=1e-6, msg=k)


def test_a_layout_change_that_would_change_the_global_batch_is_refused(source):
    tmp, data, ref_out = source
    out = str(tmp / "refused")
    cfg = _cfg(data, out, 6, 2, {"zero_stage": 1}, load=os.path.join(ref_out, "checkpoints", "step_00000003"))
    results = _run(tmp, "refused", 2, cfg)
    assert all(rc not in (0, None) for rc, _ in results)
    text = results[0][1]
    assert ("was saved with tensor_parallel x pipeline_parallel x data_parallel = 2 x 2 x 1, ZeRO 1; this run is "
            "tensor_parallel x pipeline_parallel x data_parallel = 1 x 1 x 2, ZeRO 1") in text, text[-2000:]
    assert "set train.grad_accum_steps=1" in text
    assert not os.path.exists(os.path.join(out, "checkpoints", "step_00000006"))
