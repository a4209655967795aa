"""End-to-end training under DeepSpeed on CPU with several gloo ranks (tiny model, one thread per rank).

Every rank is a separate `python pretrain_looped.py` process with a hard timeout. The runs share one
config (sampled loop counts, 2 accumulated micro-batches, ZeRO 1, checkpoint every 3 steps) so that a
handful of runs cover: PP 2 == PP 1, DP 2 with ZeRO 1/2 == one rank with twice the accumulation,
per-loop / per-layer activation checkpointing == none, exact resume after a kill during a checkpoint
save, non-finite loss, a dead rank, and refused layouts.
"""
import os
import time

import pytest

from test_train_support import (assert_ok, make_byte_dataset, metrics, run_ranks, tiny_config, train_losses, train_rows,
                                write_config)

STEPS = 8


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    data = make_byte_dataset(str(root / "data" / "corpus"))
    cache = {}

    def run(name, world, parallel=None, train=None, loop=None, fault=None, timeout=150, expect_ok=True,
            rank_env_extra=None, model=None):
        key = name
        if key in cache:
            return cache[key]
        out_dir = str(root / name)
        t = {"steps": STEPS, "grad_accum_steps": 2, "save_interval": 3}
        t.update(train or {})
        lp = {"sampling": "poisson", "mean": 2, "min": 1, "max": 4}
        lp.update(loop or {})
        par = {"zero_stage": 1}
        par.update(parallel or {})
        cfg = tiny_config(data, out_dir, train=t, loop=lp, parallel=par, model=model or {})
        path = write_config(str(root / f"{name}.yaml"), cfg)
        extra = {"MEGALOOP_FAULT": fault} if fault else None
        t0 = time.time()
        results = run_ranks(world, ["--config", path], timeout=timeout, env=extra, rank_env_extra=rank_env_extra)
        elapsed = time.time() - t0
        if expect_ok:
            assert_ok(results)
        cache[key] = (out_dir, results, elapsed)
        return cache[key]

    return run


def _close(a: dict, b: dict, steps, rel=1e-5):
    for s in steps:
        assert a[s] == pytest.approx(b[s], rel=rel, abs=1e-6), f"step {s}: {a[s]} vs {b[s]}"


def test_pipeline_2_stages_matches_single_stage(env):
    pp1, _, _ = env("pp1", 1)
    pp2, _, _ = env("pp2", 2, parallel={"pipeline_parallel": 2})
    a, b = train_losses(pp1), train_losses(pp2)
    assert sorted(a) == list(range(1, STEPS + 1))
    _close(a, b, range(1, STEPS + 1))
    ra, rb = train_rows(pp1), train_rows(pp2)
    for s in range(1, STEPS + 1):
        assert ra[s]["grad_norm"] == pytest.approx(rb[s]["grad_norm"], rel=1e-4)
        assert ra[s]["R"] == rb[s]["R"]  # the same sampled loop counts in both layouts
    # sampled R really varies across micro-batches/steps, and the loss falls
    assert len({r for s in ra for r in ra[s]["R"]}) > 1
    assert a[STEPS] < a[1] - 0.3


def test_noise_start_pipeline_3_stages_matches_single_stage_and_resumes_exactly(env):
    # state_init=noise with a prelude and a coda: PP 3 puts the looped block alone on the middle stage,
    # which reads no data (the loader's first read draws from the global RNG on the other stages). The
    # noise of micro-batch m is keyed by (seed, step, m), so PP 3 draws what PP 1 draws ...
    model = {"n_prelude": 1, "n_coda": 1, "state_init": "noise"}
    pp1, _, _ = env("noise_pp1", 1, model=model, train={"steps": 3, "save_interval": 0})
    pp3, _, _ = env("noise_pp3", 3, parallel={"pipeline_parallel": 3}, model=model,
                    train={"steps": 3, "save_interval": 0})
    a, b = train_losses(pp1), train_losses(pp3)
    assert sorted(a) == [1, 2, 3]
    _close(a, b, range(1, 4), rel=1e-6)
    # ... and a resumed run draws it again: the rank dies saving step 2, the rerun resumes from step 1.
    out, results, _ = env("noise_pp1_resume", 1, model=model, train={"steps": 3, "save_interval": 1},
                          fault="die_in_save:2", expect_ok=False)
    assert [rc for rc, _ in results] == [17]
    from test_train_support import run_ranks as _run
    results = _run(1, ["--config", os.path.join(os.path.dirname(out), "noise_pp1_resume.yaml")], timeout=150)
    assert_ok(results)
    assert "resumed from" in results[0][1] and "step_00000001" in results[0][1]
    c = train_losses(out)
    for s in (2, 3):
        assert c[s] == a[s], f"step {s}: resumed {c[s]} vs uninterrupted {a[s]}"  # bit-exact


@pytest.mark.parametrize("zero", [1, 2])
def test_data_parallel_zero_matches_single_rank_with_double_accumulation(env, zero):
    # R is shared by the DP replicas of a micro-batch (see megaloop/training/data.py), so the two layouts
    # compute the same update only with a fixed R.
    fixed = {"sampling": "fixed", "mean": 3}
    single, _, _ = env("pp1_fixed", 1, loop=fixed)  # grad_accum 2 on one rank
    dp2, _, _ = env(f"dp2_zero{zero}", 2, parallel={"zero_stage": zero}, train={"grad_accum_steps": 1}, loop=fixed)
    _close(train_losses(single), train_losses(dp2), range(1, STEPS + 1))


@pytest.mark.parametrize("loss, model", [("mean", {}), ("exit_weighted", {"exit_gate": True})])
def test_per_loop_losses_through_the_pipeline_match_single_stage(env, loss, model):
    # Per-loop losses need every gradient-carrying loop's output (and Ouro's exit probabilities) to
    # cross from the stage holding the looped block to the head stage.
    pp1, _, _ = env(f"pp1_{loss}", 1, loop={"loss": loss}, model=model)
    pp2, _, _ = env(f"pp2_{loss}", 2, parallel={"pipeline_parallel": 2}, loop={"loss": loss}, model=model)
    _close(train_losses(pp1), train_losses(pp2), range(1, STEPS + 1))
    ra, rb = train_rows(pp1), train_rows(pp2)
    for s in range(1, STEPS + 1):
        assert ra[s]["grad_norm"] == pytest.approx(rb[s]["grad_norm"], rel=1e-4)
    # ... and the loss mode is really in effect: the run differs from the last-loop-loss run
    last, _, _ = env("pp1", 1)
    a, b = train_losses(pp1), train_losses(last)
    assert any(a[s] != pytest.approx(b[s], rel=1e-4) for s in range(1, STEPS + 1))


OURO = {"n_prelude": 1, "n_loop": 2, "norm_style": "sandwich", "share_outer_final_norm": True, "exit_gate": True}


def test_ouro_with_the_looped_block_on_a_middle_stage_matches_single_stage(env):
    # PP 3 puts the looped block alone on the middle stage: it receives (e, long loop counts) and the
    # gradients of (stacked per-loop outputs, exit probabilities). DeepSpeed's receive-buffer cache once
    # handed it a float32 buffer for the loop counts at step 2 (gloo: "16 vs 8"); sampled R changes
    # the stacked size every micro-batch, and validation runs through the same stages.
    loop, train = {"loss": "exit_weighted", "exit_entropy_weight": 0.05}, {"steps": 3, "save_interval": 0,
                                                                          "eval_interval": 3, "eval_iters": 2}
    # (ZeRO 0: ZeRO >= 1 is refused for this split, see the next test)
    pp1, _, _ = env("pp1_ouro", 1, parallel={"zero_stage": 0}, loop=loop, model=OURO, train=train)
    pp3, results, _ = env("pp3_ouro", 3, parallel={"pipeline_parallel": 3, "zero_stage": 0}, loop=loop, model=OURO,
                          train=train)
    assert "pipeline stages (loop_weighted): embedding, embed_norm, prelude | loop | final_norm, head" in results[0][1]
    a, b = train_losses(pp1), train_losses(pp3)
    assert sorted(a) == sorted(b) == [1, 2, 3]
    _close(a, b, range(1, 4))
    ra, rb = train_rows(pp1), train_rows(pp3)
    for s in range(1, 4):
        assert ra[s]["grad_norm"] == pytest.approx(rb[s]["grad_norm"], rel=1e-5)
        assert ra[s]["R"] == rb[s]["R"]
    assert len({r for s in ra for r in ra[s]["R"]}) > 1  # R really varied (the stacked size changed)
    va = [row["valid_loss"] for row in metrics(pp1) if "valid_loss" in row]
    vb = [row["valid_loss"] for row in metrics(pp3) if "valid_loss" in row]
    assert len(va) == len(vb) == 1 and vb[0] == pytest.approx(va[0], rel=1e-5)


def test_zero_with_a_stage_lacking_a_norm_is_refused_not_hung(env):
    # The head stage holds the tied head alone (Ouro's final norm sits with the loop): one AdamW group
    # against two elsewhere. DeepSpeed's ZeRO all-reduces the grad norm once per group over all stages,
    # so this hung in the first optimizer step; now every rank stops at start-up with one line.
    _, results, _ = env("pp3_ouro_zero1", 3, parallel={"pipeline_parallel": 3, "zero_stage": 1}, model=OURO,
                        train={"steps": 2, "save_interval": 0}, expect_ok=False)
    assert [rc for rc, _ in results] == [2, 2, 2], [out[-2000:] for _, out in results]
    out = results[0][1]  # one rank reports the error (megaloop.errors.should_report)
    assert "different numbers of AdamW groups" in out and "parallel.zero_stage=0" in out, out[-2000:]
    assert all("Traceback" not in o for _, o in results)


def test_per_loop_activation_checkpointing_same_gradients_through_pipeline(env):
    none, _, _ = env("pp2", 2, parallel={"pipeline_parallel": 2})
    loop, _, _ = env("pp2_ckpt_loop", 2, parallel={"pipeline_parallel": 2},
                     train={"activation_checkpointing": "loop"})
    rn, rl = train_rows(none), train_rows(loop)
    for s in range(1, STEPS + 1):
        assert rl[s]["loss"] == pytest.approx(rn[s]["loss"], rel=1e-6, abs=1e-7)
        assert rl[s]["grad_norm"] == pytest.approx(rn[s]["grad_norm"], rel=1e-6)


def test_kill_during_save_then_exact_resume(env):
    full, _, _ = env("pp2", 2, parallel={"pipeline_parallel": 2})
    # Both ranks die after writing the step-6 files but before the completeness marker.
    out, results, _ = env("pp2_resume", 2, parallel={"pipeline_parallel": 2}, fault="die_in_save:6",
                          expect_ok=False)
    assert all(rc == 17 for rc, _ in results), [rc for rc, _ in results]
    ck = os.path.join(out, "checkpoints")
    assert os.path.isdir(os.path.join(ck, "step_00000006"))  # files were written ...
    assert not os.path.exists(os.path.join(ck, "step_00000006", "megaloop_complete.json"))  # ... but not marked
    assert open(os.path.join(ck, "latest")).read().strip() == "step_00000003"
    # Resume (same output dir: automatic resume from the newest complete checkpoint).
    del_key = "pp2_resume"
    from test_train_support import run_ranks as _run
    cfg_path = os.path.join(os.path.dirname(out), f"{del_key}.yaml")
    results = _run(2, ["--config", cfg_path], timeout=150)
    assert_ok(results)
    assert any("resumed from" in o and "step_00000003" in o for _, o in results)
    a, b = train_losses(full), train_losses(out)
    for s in range(4, STEPS + 1):
        assert b[s] == a[s], f"step {s}: resumed {b[s]} vs uninterrupted {a[s]}"  # bit-exact
    ra, rb = train_rows(full), train_rows(out)
    assert all(ra[s]["R"] == rb[s]["R"] for s in range(4, STEPS + 1))


def test_nonfinite_loss_stops_naming_step_and_checkpoint(env):
    out, results, _ = env("nan", 1, fault="nan_at_step:4", expect_ok=False)
    rc, text = results[0]
    assert rc == 3, text[-2000:]
    assert "non-finite loss" in text and "step 5" in text and "step_00000003" in text


def test_dead_rank_makes_the_others_exit_in_bounded_time(env):
    # DP 2, ZeRO 2, sampled R (the replicas must agree on R or the gradient reduce-scatter mismatches):
    # trains 3 steps, then rank 1 dies.
    out, results, elapsed = env("dead", 2, parallel={"zero_stage": 2}, train={"grad_accum_steps": 1,
                                "dist_timeout": 20}, fault="die_at_step:3:1", expect_ok=False, timeout=90)
    rcs = [rc for rc, _ in results]
    assert rcs[1] == 13
    assert sorted(train_losses(out)) == [1, 2, 3]
    assert rcs[0] is not None and rcs[0] != 0, "rank 0 hung or succeeded although rank 1 died"
    assert elapsed < 90  # (start-up, 3 steps, and the ~5 s in which rank 0 watches the heartbeats to name rank 1)
    # one line naming the dead rank and the last complete checkpoint (megaloop/training/peers.py)
    assert rcs[0] == 2 and "Traceback" not in results[0][1], results[0][1][-3000:]
    assert "error: rank 1 died (connection closed by peer); the last complete checkpoint is " in results[0][1]
    assert "step_00000003" in results[0][1]


def test_refused_layouts_fail_fast_with_their_message(tmp_path):
    from megaloop.config import ConfigError, load_config
    with pytest.raises(ConfigError, match="ZeRO 0 and 1 only"):
        load_config(None, ["parallel.pipeline_parallel=2", "parallel.zero_stage=2"])
    with pytest.raises(ConfigError, match="at most 3 stages"):
        load_config(None, ["parallel.pipeline_parallel=4"])
    with pytest.raises(ConfigError, match="fp16 only"):
        load_config(None, ["train.loss_scale=128"])
    # A layout the world cannot hold is refused at startup, before any model is built.
    t0 = time.time()
    cfg = write_config(str(tmp_path / "c.yaml"), tiny_config("/nonexistent", str(tmp_path / "o")))
    (rc, text), = run_ranks(1, ["--config", cfg, "parallel.pipeline_parallel=2"], timeout=60)
    assert rc == 2 and "not divisible" in text and "pipeline_parallel=2" in text
    (rc, text), = run_ranks(1, ["--config", cfg, "parallel.zero_stage=3", "parallel.pipeline_parallel=2"], timeout=60)
    assert rc == 2 and "ZeRO 0 and 1 only" in text
    assert time.time() - t0 < 60


def test_tensor_2_x_pipeline_2_matches_single_rank(env):
    # QK-norm (replicated weight with per-rank partial gradients) and one kv head shared by both TP
    # ranks (kv-replicated wk/wv): the gradients that need a TP sum before DeepSpeed's ZeRO hooks.
    model = {"qk_norm": True, "n_kv_heads": 1}
    single, _, _ = env("pp1_tpref", 1, model=model)
    tp_pp, _, _ = env("tp2_pp2", 4, parallel={"pipeline_parallel": 2, "tensor_parallel": 2}, model=model,
                      timeout=240)
    _close(train_losses(single), train_losses(tp_pp), range(1, STEPS + 1), rel=1e-4)
    ra, rb = train_rows(single), train_rows(tp_pp)
    for s in range(1, STEPS + 1):
        assert ra[s]["grad_norm"] == pytest.approx(rb[s]["grad_norm"], rel=1e-3)
    # the TP x PP checkpoint merges back into the one-process model
    import torch
    from megaloop.checkpoint import load
    a, _ = load(os.path.join(single, "checkpoints", "step_00000006"))
    b, _ = load(os.path.join(tp_pp, "checkpoints", "step_00000006"))
    assert set(a) == set(b)
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-3, atol=1e-5), k


def test_checkpoints_consolidate_to_the_same_model_whatever_the_layout(env):
    import torch
    from megaloop.checkpoint import load, load_model
    pp1, _, _ = env("pp1", 1)
    pp2, _, _ = env("pp2", 2, parallel={"pipeline_parallel": 2})
    a, cfg = load(os.path.join(pp1, "checkpoints"))
    b, _ = load(os.path.join(pp2, "checkpoints", "step_00000006"))
    assert cfg.train.steps == STEPS
    final_a, _ = load(os.path.join(pp1, "checkpoints", "step_00000006"))
    assert set(final_a) == set(b)
    for k in b:
        assert torch.allclose(final_a[k], b[k], rtol=1e-4, atol=1e-6), k
    model, _ = load_model(os.path.join(pp2, "checkpoints"))
    assert model(torch.zeros(1, 8, dtype=torch.long), loops=2).logits.shape[-1] == 258


def test_restart_after_a_dead_rank_resumes_exactly_under_zero2(env):
    # The job of the dead-rank test (DP 2, ZeRO 2: partitioned optimizer states, sampled R) restarted
    # from its last complete checkpoint (step 3) reproduces an uninterrupted run bit for bit.
    from test_train_support import run_ranks as _run
    dead, _, _ = env("dead", 2, parallel={"zero_stage": 2}, train={"grad_accum_steps": 1, "dist_timeout": 20},
                     fault="die_at_step:3:1", expect_ok=False, timeout=90)
    full, _, _ = env("dp2_zero2_sampled", 2, parallel={"zero_stage": 2},
                     train={"grad_accum_steps": 1, "dist_timeout": 20})
    results = _run(2, ["--config", os.path.join(os.path.dirname(dead), "dead.yaml")], timeout=150)
    assert_ok(results)
    a, b = train_rows(full), train_rows(dead)
    for s in range(4, STEPS + 1):
        assert b[s]["loss"] == a[s]["loss"] and b[s]["R"] == a[s]["R"], s
