"""loop.granularity='sequence' (Parcae's per-sequence depth; issue 13 item 3).

- the draws are a pure function of (seed, step, micro-batch, row): the same whoever asks (every TP rank and
  pipeline stage draws them from the same inputs), independent of the batch size, different across rows;
- a row's output and gradients with per-row depths equal those of the row run alone at its own R
  (with and without loop.backprop_loops, with per-loop activation checkpointing, outer normalisation);
- unsupported combinations are refused by config validation;
- PP = 2 trains exactly like PP = 1 (the per-row loop counts cross the stage boundary).
"""
import pytest
import torch

from megaloop.config import ConfigError, config_from_dict
from megaloop.model import build_model
from megaloop.model.loop_schedule import (fixed_loops_tensor, logged_loops, loops_tensor, sample_loops,
                                          sample_row_loops, unpack_loops)

V, T = 64, 8


def _cfg(model=None, loop=None):
    m = {"d_model": 32, "n_heads": 4, "n_kv_heads": 2, "n_prelude": 1, "n_loop": 2, "n_coda": 1, "vocab_size": V,
         "max_seq_len": T, "mlp": "relu2", "qk_norm": True, "injection": "parcae", "normalization": "inner",
         "state_init": "noise"}
    m.update(model or {})
    lp = {"sampling": "poisson", "mean": 4, "max": 8, "granularity": "sequence"}
    lp.update(loop or {})
    return config_from_dict({"model": m, "loop": lp, "data": {"seq_len": T}})


# --- the draws -------------------------------------------------------------------------------------
def test_row_draws_are_a_pure_function_of_seed_step_microbatch_row():
    lp = _cfg(loop={"backprop_loops": 2}).loop
    a = loops_tensor(lp, 7, 3, 1, 16)
    assert a.shape == (16, 2) and a.dtype == torch.long
    assert torch.equal(a, loops_tensor(lp, 7, 3, 1, 16))  # any rank / stage asking gets the same counts
    assert torch.equal(a[:5], loops_tensor(lp, 7, 3, 1, 5))  # row b's draw does not depend on the batch size
    assert len(set(a[:, 0].tolist())) > 2  # rows differ
    assert torch.equal(a[:, 1], a[:, 0].clamp(max=2))  # gradients through the last min(R, 2)
    assert not torch.equal(a, loops_tensor(lp, 7, 3, 2, 16))  # another micro-batch
    assert not torch.equal(a, loops_tensor(lp, 7, 4, 1, 16))  # another step
    assert not torch.equal(a, loops_tensor(lp, 8, 3, 1, 16))  # another seed
    counts = [c.total for s in range(200) for c in sample_row_loops(lp, 0, s, 0, 4)]
    assert min(counts) >= 1 and max(counts) <= 8
    assert sum(counts) / len(counts) == pytest.approx(4, abs=0.3)  # max(1, Poisson(4)) clipped at 8


def test_micro_batch_granularity_is_unchanged():
    lp = _cfg(loop={"granularity": "micro_batch", "backprop_loops": 2}).loop
    lc = sample_loops(lp, 7, 3, 1)
    assert loops_tensor(lp, 7, 3, 1, 16).tolist() == [lc.total, lc.grad]
    assert unpack_loops(loops_tensor(lp, 7, 3, 1, 16)) == (lc.total, lc.grad)
    assert logged_loops(loops_tensor(lp, 7, 3, 1, 16)) == lc.total
    assert fixed_loops_tensor(lp, 5, 4).tolist() == [5, 5]
    seq = _cfg().loop
    assert fixed_loops_tensor(seq, 5, 3).tolist() == [[5, 5]] * 3
    rows = torch.tensor([[2, 2], [6, 4], [1, 1]])
    total, grad = unpack_loops(rows)
    assert total.tolist() == [2, 6, 1] and grad.tolist() == [2, 4, 1]
    assert logged_loops(rows) == 3.0  # the work: each row runs its own R


# --- a row equals the row run alone ------------------------------------------------------------------
def _fixed_noise(lm):
    """Row-independent 'noise' initial state (a fixed function of e), so a row alone starts identically."""
    lm.block.initial_state = lambda e, generator=None: 0.02 * torch.sin(3.0 * e + 1.0)


CASES = [
    ({}, None, "none"),
    ({}, 2, "none"),
    ({}, 2, "loop"),
    ({}, 1, "layer"),
    ({"injection": "add", "normalization": "outer"}, 2, "loop"),  # raw last output vs normed carries
]


@pytest.mark.parametrize("model, backprop, ckpt", CASES)
def test_each_row_equals_the_row_run_alone(model, backprop, ckpt):
    cfg = _cfg(model=model)
    torch.manual_seed(0)
    lm = build_model(cfg)
    lm.block.activation_checkpointing = ckpt
    _fixed_noise(lm)
    g = torch.Generator().manual_seed(1)
    tokens, labels = torch.randint(0, V, (4, T), generator=g), torch.randint(0, V, (4, T), generator=g)
    R = torch.tensor([1, 5, 3, 2])
    G = R if backprop is None else R.clamp(max=backprop)

    out = lm(tokens, loops=R, grad_loops=G)
    assert out.loops == 5
    # per-row summed losses: d(sum_b loss_b)/dtheta = sum_b of each row's own gradient
    per_token = torch.nn.functional.cross_entropy(out.logits.reshape(-1, V), labels.reshape(-1), reduction="none")
    per_token.view(4, T).mean(1).sum().backward()
    got = {n: p.grad.clone() for n, p in lm.named_parameters() if p.grad is not None}

    want, logits = {}, []
    for b in range(4):
        lm.zero_grad()
        o = lm(tokens[b:b + 1], labels=labels[b:b + 1], loops=int(R[b]), grad_loops=int(G[b]))
        o.loss.backward()
        logits.append(o.logits.detach())
        for n, p in lm.named_parameters():
            if p.grad is not None:
                want[n] = want.get(n, 0) + p.grad
    torch.testing.assert_close(out.logits.detach(), torch.cat(logits), rtol=1e-5, atol=1e-6)
    assert set(got) == set(want)
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-4, atol=1e-6, msg=n)


def test_truncated_backprop_is_per_row():
    """With backprop_loops=1 the gradient of a deep row reaches only its last iteration: the injection's B
    (used every loop) gets a gradient from the row alone at G=1, which differs from the one at G=R."""
    cfg = _cfg()
    torch.manual_seed(0)
    lm = build_model(cfg)
    _fixed_noise(lm)
    tokens = torch.randint(0, V, (2, T), generator=torch.Generator().manual_seed(2))
    grads = []
    for G in ([1, 1], [1, 4]):
        lm.zero_grad()
        lm(tokens, loops=torch.tensor([1, 4]), grad_loops=torch.tensor(G)).logits[1].pow(2).mean().backward()
        grads.append(lm.block.injection.B.grad.clone())
    assert not torch.allclose(grads[0], grads[1])


def test_diagnostics_average_over_the_rows_still_updating():
    lm = build_model(_cfg(model={"state_init": "zeros"}))
    tokens = torch.randint(0, V, (2, T))
    with torch.no_grad():
        d = lm(tokens, loops=torch.tensor([1, 3]), return_diagnostics=True).diagnostics
        alone = lm(tokens[1:], loops=3, return_diagnostics=True).diagnostics
    assert d["state_norm"].shape == (3,)
    torch.testing.assert_close(d["state_norm"][1:], alone["state_norm"][1:], rtol=1e-5, atol=1e-6)


# --- refused combinations ----------------------------------------------------------------------------
@pytest.mark.parametrize("model, loop, words", [
    ({"arch": "flt", "injection": "none", "normalization": "outer", "state_init": "embed"}, {}, "model.arch"),
    ({"exit_gate": True}, {"loss": "exit_weighted"}, "loop.loss"),
    ({"exit_gate": True}, {}, "model.exit_gate"),
    ({}, {"loss": "mean"}, "loop.loss"),
    ({"loop_residual_gate": True}, {}, "model.loop_residual_gate"),
    ({"mixer": "dsa"}, {}, "dsa"),
])
def test_unsupported_combinations_are_refused(model, loop, words):
    with pytest.raises(ConfigError, match="loop.granularity='sequence'") as e:
        _cfg(model=model, loop=loop)
    assert words in str(e.value)


def test_bad_granularity_name_is_refused():
    with pytest.raises(ConfigError, match="loop.granularity"):
        _cfg(loop={"granularity": "per_token"})


def test_parcae_configs_draw_per_sequence():
    from megaloop.config import load_config
    for path in ("yaml_configs/tiny/parcae.yaml", "yaml_configs/parcae_770m_8gpu.yaml"):
        assert load_config(path, []).loop.granularity == "sequence", path
    assert load_config(None, []).loop.granularity == "micro_batch"


# --- PP = 2 equals PP = 1 ----------------------------------------------------------------------------
def test_pipeline_2_stages_matches_single_stage_with_per_sequence_loops(tmp_path):
    from test_train_support import (assert_ok, make_byte_dataset, metrics, run_ranks, tiny_config, train_rows,
                                    write_config)
    data = make_byte_dataset(str(tmp_path / "corpus"), max_bytes=150_000)
    rows = {}
    for pp in (1, 2):
        out = str(tmp_path / f"pp{pp}")
        cfg = tiny_config(data, out,
                          model={"n_prelude": 1, "n_coda": 1, "injection": "parcae", "normalization": "inner",
                                 "state_init": "noise", "mlp": "relu2"},
                          loop={"sampling": "poisson", "mean": 3, "max": 6, "backprop_loops": 2,
                                "granularity": "sequence"},
                          train={"steps": 4, "grad_accum_steps": 2, "log_interval": 2, "eval_interval": 4,
                                 "eval_iters": 1, "activation_checkpointing": "loop"},
                          data={"split": "80,20,0"}, parallel={"pipeline_parallel": pp, "zero_stage": 1})
        assert_ok(run_ranks(pp, ["--config", write_config(str(tmp_path / f"pp{pp}.yaml"), cfg)], timeout=150))
        rows[pp] = train_rows(out)
        rows[pp]["valid"] = [r["valid_loss"] for r in metrics(out) if "valid_loss" in r]
    assert sorted(k for k in rows[1] if k != "valid") == [1, 2, 3, 4]
    for s in range(1, 5):
        a, b = rows[1][s], rows[2][s]
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-6), s
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4), s
        assert a["R"] == b["R"]  # the mean of the rows' R of each micro-batch
    # the rows of a micro-batch really drew different depths (R logged is their mean)
    assert any(r != int(r) for s in range(1, 5) for r in rows[1][s]["R"])
    # validation (a fixed R in the per-row layout) through both layouts
    assert len(rows[1]["valid"]) == 1
    assert rows[1]["valid"] == pytest.approx(rows[2]["valid"], rel=1e-5)


# --- TP = 2 equals TP = 1 ----------------------------------------------------------------------------
def _tp_job(rank, world):
    from megaloop.config import ParallelConfig, load_config
    from megaloop.parallel import build_parallel_state
    from megaloop.parallel.apply_tp import apply_tensor_parallel
    from test_tp_model import SMALL, _batch, _compare
    state = build_parallel_state(ParallelConfig(tensor_parallel=2))
    cfg = load_config("yaml_configs/tiny/parcae.yaml", SMALL)
    out = {}
    for ckpt in ("none", "loop"):
        torch.manual_seed(0)
        ref = build_model(cfg)
        torch.manual_seed(0)
        model = apply_tensor_parallel(build_model(cfg), state)
        ref.block.activation_checkpointing = model.block.activation_checkpointing = ckpt
        x, y = _batch()
        R = torch.tensor([1, 4])
        res = _compare(model, ref, x, y, R, R.clamp(max=cfg.loop.backprop_loops), {})
        out[ckpt] = (res["errors"], res["max_grad_diff"])
    return out


def test_tensor_parallel_2_matches_single_rank_with_per_sequence_loops():
    from dist_utils import run_distributed
    for rank_out in run_distributed(_tp_job, world_size=2, timeout=420):
        for ckpt, (errors, max_grad_diff) in rank_out.items():
            assert not errors, (ckpt, errors)
            assert max_grad_diff < 1e-5
