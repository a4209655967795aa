"""train.diag_interval (issue 13): the fixed-point / per-loop gradient diagnostics wired into training.

- a tiny run with diag_interval=2 writes the diagnostic rows at steps 2 and 4 and nowhere else, and
  trains exactly like the same run without diagnostics (same losses, bit for bit);
- diag_interval=0 builds nothing and calls none of the diagnostic functions;
- the logged per-loop gradient norms are those of the per-loop contributions that sum to `.grad`;
- TP = 2 (with and without sequence parallelism, kv heads replicated) gives the TP = 1 numbers;
- models with DSA layers skip the spectral norm only; unsupported layouts are refused by validation;
- per-sequence loop counts: the rows sharing the first row's depth are the batch.
"""
import pytest
import torch

from dist_utils import run_distributed
from test_train_support import make_byte_dataset, metrics, tiny_config, write_config

from megaloop.config import ConfigError, load_config
from megaloop.model import build_model
from megaloop.model.fixed_point import per_loop_grad_contributions
from megaloop.training.diagnostics import compute_diagnostics, diag_due, has_dsa

SMALL = ["model.d_model=16", "model.n_heads=2", "model.n_kv_heads=1", "model.n_loop=2",
         "model.max_seq_len=16", "data.seq_len=16"]


def _batch(B=2, T=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 258, (B, T + 1), generator=g)
    return x[:, :-1], x[:, 1:].clone()


# ---------------------------------------------------------------------------------------------
# Training runs (in-process Trainer on one spawned rank, diagnostic functions wrapped to count calls)

def _train(rank, world, cfg_path):
    import megaloop.model.fixed_point as F
    import megaloop.training.diagnostics as D
    from megaloop.training.trainer import Trainer
    calls = []
    for mod in (D, F):
        for name in ("loop_map_spectral_norm", "input_dependence", "per_loop_grads", "per_loop_grad_contributions",
                     "compute_diagnostics", "contribution_stats"):
            if hasattr(mod, name):
                def wrapped(*a, _orig=getattr(mod, name), _name=name, **k):
                    calls.append(_name)
                    return _orig(*a, **k)
                setattr(mod, name, wrapped)
    init = D.TrainingDiagnostics.__init__

    def counting_init(self, *a, **k):
        calls.append("TrainingDiagnostics")
        init(self, *a, **k)
    D.TrainingDiagnostics.__init__ = counting_init
    out = Trainer(load_config(cfg_path)).run()
    return {"calls": calls, "losses": out["losses"]}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("diag")
    data = make_byte_dataset(str(root / "corpus"), max_bytes=60_000)
    out = {}
    for interval in (0, 2):
        cfg = tiny_config(data, str(root / f"run{interval}"),
                          model={"n_loop": 2, "dropout": 0.1},  # dropout on: diagnostics must not draw from its RNG
                          train={"steps": 5, "log_interval": 3, "diag_interval": interval, "tensorboard": True},
                          parallel={"zero_stage": 2})  # (DeepSpeed's gradient hooks must survive the diagnostics)
        path = write_config(str(root / f"cfg{interval}.yaml"), cfg)
        (res,) = run_distributed(_train, world_size=1, args=(path,), timeout=240)
        out[interval] = (res, metrics(str(root / f"run{interval}")), str(root / f"run{interval}"))
    return out


def test_diag_rows_at_steps_2_and_4_only(runs):
    res, rows, out_dir = runs[2]
    diag = [r for r in rows if "diagnostics" in r]
    assert [r["step"] for r in diag] == [2, 4]
    assert not any("diagnostics" in r for r in rows if r["step"] not in (2, 4))
    for r in diag:
        d = r["diagnostics"]
        assert d["loops"] == 2 and d["groups"] == ["layer0", "layer1"]
        assert 0 < d["loop_map_spectral_norm"] < 100 and 0 < d["input_dependence"] < 100
        assert len(d["grad_norm"]) == 2 and all(len(row) == 2 for row in d["grad_norm"])
        assert all(v > 0 for row in d["grad_norm"] for v in row)
        assert d["grad_cosine"][0] == [None, None]
        assert all(-1 - 1e-9 <= c <= 1 + 1e-9 for c in d["grad_cosine"][1])
    # one call of each per diagnostic step
    assert res["calls"].count("TrainingDiagnostics") == 1
    assert res["calls"].count("compute_diagnostics") == 2
    assert res["calls"].count("loop_map_spectral_norm") == 2 and res["calls"].count("per_loop_grads") == 2
    # TensorBoard got the scalars
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(out_dir + "/tensorboard")
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"diag/loop_map_spectral_norm", "diag/input_dependence", "diag/grad_norm/layer1/loop02",
            "diag/grad_cosine/layer0/loop02"} <= tags
    assert "diag/grad_cosine/layer0/loop01" not in tags
    assert [e.step for e in acc.Scalars("diag/input_dependence")] == [2, 4]


def test_interval_0_builds_and_calls_nothing_and_diagnostics_do_not_change_training(runs):
    off, rows_off, _ = runs[0]
    on, _, _ = runs[2]
    assert off["calls"] == []
    assert not any("diagnostics" in r for r in rows_off)
    assert off["losses"] == on["losses"]  # same dropout draws, same weights: bit-identical training


def test_diag_due():
    assert [s for s in range(1, 9) if diag_due(s, 3)] == [3, 6]
    assert not any(diag_due(s, 0) for s in range(1, 9))


# ---------------------------------------------------------------------------------------------
# What is logged

def test_logged_grad_norms_are_the_contributions_that_sum_to_the_gradient():
    torch.manual_seed(0)
    model = build_model(load_config(None, SMALL + ["model.injection=add"]))
    x, y = _batch(seed=3)
    d = compute_diagnostics(model, x, y, loops=3, seed=7)
    assert model.training  # restored
    assert all(p.grad is None for p in model.parameters())
    model.eval()
    ref = per_loop_grad_contributions(model, x, y, loops=3, return_grads=True)
    torch.testing.assert_close(torch.tensor(d["grad_norm"], dtype=torch.float64), ref["grad_norm"],
                               rtol=1e-12, atol=0)
    model(x, labels=y, loops=3).loss.backward()
    params = dict(model.block.named_parameters())
    for name, per in ref["grads"].items():
        torch.testing.assert_close(per.sum(0), params[name].grad, rtol=0, atol=1e-6)
    # an independent norm and cosine of one (loop, group)
    members = [n for n in ref["grads"] if n.startswith("layers.0.")]
    v = [torch.cat([ref["grads"][n][t].reshape(-1) for n in members]).double() for t in range(3)]
    assert d["grad_norm"][2][0] == pytest.approx(v[2].norm().item(), rel=1e-12)
    assert d["grad_cosine"][2][0] == pytest.approx((v[2] @ v[1] / (v[2].norm() * v[1].norm())).item(), rel=1e-9)
    assert d["grad_cosine"][0] == [None] * len(d["groups"])


def test_dsa_model_skips_the_spectral_norm_only():
    cfg = load_config("yaml_configs/tiny/lt2_gdn_dsa.yaml")
    torch.manual_seed(0)
    model = build_model(cfg)
    assert has_dsa(model)
    assert not has_dsa(build_model(load_config(None, SMALL)))
    x, y = _batch(seed=1)
    d = compute_diagnostics(model, x, y, loops=2, spectral=False)
    assert d["loop_map_spectral_norm"] is None and d["input_dependence"] > 0
    assert "spectral_norm_skipped" not in d
    assert all(v >= 0 for row in d["grad_norm"] for v in row)
    # asked anyway: the kernel's missing forward-mode AD is caught, the rest still computed
    d2 = compute_diagnostics(model, x, y, loops=2, spectral=True)
    assert d2["loop_map_spectral_norm"] is None and "jvp" in d2["spectral_norm_skipped"]
    assert d2["input_dependence"] == d["input_dependence"] and d2["grad_norm"] == d["grad_norm"]


@pytest.mark.parametrize("over,match", [
    (["train.diag_interval=2", "parallel.zero_stage=3"], "diag_interval=2 .*zero_stage=3"),
    (["train.diag_interval=2", "train.compile=true"], "diag_interval=2 .*train.compile"),
    (["train.diag_interval=2", "model.value_embeddings=true"], "diag_interval=2 .*value_embeddings"),
    (["train.diag_interval=-1"], "train.diag_interval"),
])
def test_unsupported_layouts_refused(over, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, over)


# ---------------------------------------------------------------------------------------------
# Tensor parallelism: TP = 2 equals TP = 1 on the same weights and batch

TP_CASES = {"lt_kv_replicated_qknorm": ("yaml_configs/tiny/lt.yaml", ["model.n_kv_heads=1", "model.qk_norm=true"]),
            "parcae_noise_start": ("yaml_configs/tiny/parcae.yaml", [])}
SHORT = ["model.max_seq_len=16", "data.seq_len=16"]


def _tp_job(rank, world):
    import torch.distributed as dist
    from megaloop.parallel.apply_tp import apply_tensor_parallel
    from megaloop.parallel.comm import TPComm
    out = {}
    x, y = _batch(seed=5)
    for name, (path, over) in TP_CASES.items():
        cfg = load_config(path, SHORT + over)
        torch.manual_seed(0)
        ref = build_model(cfg)
        out[(name, "ref")] = compute_diagnostics(ref, x, y, loops=3, seed=11)
        for sp in (False, True):
            torch.manual_seed(0)
            model = build_model(cfg)
            comm = TPComm(dist.group.WORLD)
            apply_tensor_parallel(model, comm, sequence_parallel=sp)
            out[(name, sp)] = compute_diagnostics(model, x, y, loops=3, seed=11, comm=model.tp_comm,
                                                  seq_comm=model.tp_comm if sp else None, tp_rank=rank)
    return out


def _assert_same(a, b, rel):
    assert a["groups"] == b["groups"]
    for k in ("loop_map_spectral_norm", "input_dependence"):
        assert a[k] == pytest.approx(b[k], rel=rel), k
    for k in ("grad_norm", "grad_cosine"):
        for ra, rb in zip(a[k], b[k]):
            for va, vb in zip(ra, rb):
                assert (va is None) == (vb is None), k
                if va is not None:
                    assert va == pytest.approx(vb, rel=rel, abs=1e-7), (k, ra, rb)


def test_tensor_parallel_2_matches_one_process():
    res = run_distributed(_tp_job, world_size=2, timeout=240)
    for name in TP_CASES:
        ref = res[0][(name, "ref")]
        for rank in (0, 1):
            for sp in (False, True):
                _assert_same(res[rank][(name, sp)], ref, rel=1e-4)


@pytest.mark.parametrize("ckpt", ["loop", "layer"])
def test_activation_checkpointing_gives_the_same_diagnostics(ckpt):
    x, y = _batch(seed=2)
    out = {}
    for mode in ("none", ckpt):
        torch.manual_seed(0)
        model = build_model(load_config(None, SMALL + ["model.arch=flt"]))
        model.block.activation_checkpointing = mode  # what the training set-up sets
        out[mode] = compute_diagnostics(model, x, y, loops=3, seed=4)
    _assert_same(out[ckpt], out["none"], rel=1e-6)


def test_per_sequence_loops_use_the_rows_sharing_the_first_rows_depth():
    """loop.granularity=sequence: the diagnostics run on the rows with the first row's (R, R_grad)."""
    from types import SimpleNamespace
    from megaloop.training.diagnostics import TrainingDiagnostics
    cfg = load_config(None, SMALL + ["train.diag_interval=1", "train.seed=3"])
    torch.manual_seed(0)
    model = build_model(cfg.model)
    x, y = _batch(B=4, seed=6)
    state = SimpleNamespace(dp_rank=0, tp_rank=0, sequence_parallel=False)
    diag = TrainingDiagnostics(cfg, state, model, None, print)
    got = diag.run(5, x, y, torch.tensor([3, 2, 3, 3]), torch.tensor([3, 2, 3, 1]))
    rows = torch.tensor([0, 2])
    want = compute_diagnostics(model, x[rows], y[rows], loops=3, grad_loops=3, seed=3 + 5)
    assert got == want
