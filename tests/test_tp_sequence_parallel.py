"""Megatron sequence parallelism (SP) on the whole looped family: TP = 2 with SP equals TP = 1.

As tests/test_tp_model.py: ONE spawned 2-rank gloo job, whose results the tests below read. The
TP = 1 reference and the TP = 2 SP shard are built from the same seed on every rank. Same tolerances
as the TP tests (fp32): logits and loss atol 2e-5 / rtol 1e-5; gradients atol 1e-6 (+ rtol 1e-4),
after the TP gradient hooks (which under SP also sum the replicated parameters' per-shard gradients).
"""
import time

import pytest
import torch

from dist_utils import run_distributed
from megaloop.config import ConfigError, ParallelConfig, load_config
from megaloop.model import build_model
from megaloop.parallel.apply_tp import TensorParallelError, apply_tensor_parallel, validate_tensor_parallel
from test_tp_model import ROOT, SMALL, _batch, _cases, _compare

COUNTED = [("lt", 1, None), ("lt", 4, None), ("flt", 3, None), ("parcae", 5, 2), ("lt2_gdn", 2, None),
           ("lt2_gdn_dsa", 2, None), ("swa", 2, None)]


def _equivalence(rank, state):
    from megaloop.parallel.apply_tp import gather_full_state_dict
    out = {}
    for name, (path, over) in _cases().items():
        cfg = load_config(path, SMALL + over)
        torch.manual_seed(0)
        ref = build_model(cfg)
        torch.manual_seed(0)
        model = apply_tensor_parallel(build_model(cfg), state, sequence_parallel=True)
        x, y = _batch()
        kw = dict(exit="q_exit", exit_threshold=0.6) if cfg.model.exit_gate else {}
        res = _compare(model, ref, x, y, 3, cfg.loop.backprop_loops, kw)
        # the block's diagnostics are means over the whole sequence (all-reduced over the shards)
        with torch.no_grad():
            torch.manual_seed(2)
            d_tp = model(x, loops=2, return_diagnostics=True).diagnostics
            torch.manual_seed(2)
            d_ref = ref(x, loops=2, return_diagnostics=True).diagnostics
        res["diag_err"] = max((d_tp[k] - d_ref[k]).abs().max().item() for k in d_ref)
        full = gather_full_state_dict(model)
        res["state_dict_equal"] = set(full) == set(ref.state_dict()) and \
            all(torch.equal(full[k], v) for k, v in ref.state_dict().items())
        out[name] = res
    return out


def _counting(rank, state):
    out = {}
    for name, R, G in COUNTED:
        cfg = load_config(ROOT / f"yaml_configs/tiny/{name}.yaml", SMALL + ["model.dsa_indexer_loss_coef=0.0"]
                          if name == "lt2_gdn_dsa" else SMALL)
        torch.manual_seed(0)
        model = apply_tensor_parallel(build_model(cfg), state, sequence_parallel=True)
        x, y = _batch()
        with model.tp_comm.counting() as c:
            model(x, labels=y, loops=R, grad_loops=G).loss.backward()
        m = cfg.model
        from megaloop.parallel.tensor_parallel import partition_of
        hooked = sum(1 for p in model.parameters() if p.grad is not None
                     and partition_of(p).kind in ("replicated_partial_grad", "kv_replicated"))
        out[(name, R, G)] = dict(
            L=m.n_loop, P=m.n_prelude, C=m.n_coda, S=R if cfg.loop.loss == "mean" else 1, total=c.count(),
            grad_hooks=c.count("all_reduce", "other"),
            hooked=hooked,
            **{f"{ph}_{op}": c.count(op, ph) for ph in ("forward", "backward")
               for op in ("all_gather", "reduce_scatter", "all_reduce")})
    return out


def _extras(rank, state):
    """Activation checkpointing and dropout under SP; refusal of an indivisible sequence."""
    from megaloop.parallel.apply_tp import gather_full_grads
    from megaloop.parallel.random import check_rng_in_step
    res = {}
    # checkpointing (loop / layer) recomputes the same thing: same gradients as without
    for path in ("lt.yaml", "huginn.yaml", "flt.yaml"):
        cfg = load_config(ROOT / "yaml_configs/tiny" / path, SMALL)
        torch.manual_seed(0)
        ref = build_model(cfg)
        torch.manual_seed(0)
        model = apply_tensor_parallel(build_model(cfg), state, sequence_parallel=True)
        x, y = _batch()
        for mode in ("loop", "layer"):
            model.zero_grad()
            ref.zero_grad()
            model.block.activation_checkpointing = mode
            res[(path, mode)] = _compare(model, ref, x, y, 3, None, {})["errors"]
    # dropout: runs, differs between calls, the default generators stay in step
    cfg = load_config(ROOT / "yaml_configs/tiny/lt.yaml", SMALL + ["model.dropout=0.2"])
    torch.manual_seed(0)
    model = apply_tensor_parallel(build_model(cfg), state, sequence_parallel=True).train()
    x, y = _batch()
    losses = []
    for seed in (12, 13):
        torch.manual_seed(seed)
        loss = model(x, labels=y, loops=3).loss
        loss.backward()
        losses.append(loss.item())
    gathered = model.tp_comm.all_gather(torch.tensor(losses)[None], dim=0)
    res["dropout_active"] = losses[0] != losses[1]
    res["dropout_loss_same_on_ranks"] = torch.equal(gathered[0], gathered[1])
    check_rng_in_step(model.tp_comm)
    # a sequence that does not split over the TP ranks is refused, naming the numbers
    try:
        model(x[:, :15], labels=y[:, :15])
        res["odd_refused"] = None
    except TensorParallelError as e:
        res["odd_refused"] = str(e)
    return res


def _job(rank, world):
    from megaloop.parallel import build_parallel_state
    state = build_parallel_state(ParallelConfig(tensor_parallel=2, sequence_parallel=True))
    assert state.tp_size == 2 and state.sequence_parallel
    t0 = time.time()
    out = dict(equivalence=_equivalence(rank, state), counting=_counting(rank, state), extras=_extras(rank, state))
    out["seconds"] = time.time() - t0
    return out


@pytest.fixture(scope="module")
def sp2():
    return run_distributed(_job, world_size=2, timeout=300)


# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", sorted(_cases()))
def test_sp_tp2_equals_tp1_logits_loss_grads(sp2, arch):
    for rank in (0, 1):
        r = sp2[rank]["equivalence"][arch]
        assert not r["errors"], (arch, rank, r["errors"][:3])
        assert r["logits_shape"] == (2, 16, 258)
        assert r["replicated_grad_rank_diff"] == 0.0, r["replicated_grad_rank_diff"]
        assert r["state_dict_equal"]
        assert r["diag_err"] < 1e-5, r["diag_err"]


def test_sp_collectives_all_gather_and_reduce_scatter_per_sub_layer(sp2):
    for (name, R, G), c in sp2[0]["counting"].items():
        G = R if G is None else G
        fwd_layers = c["P"] + c["L"] * R + c["C"]
        bwd_layers = c["P"] + c["L"] * G + c["C"]
        S = c["S"]  # loops scored by the LM head and the loss (R under loop.loss: mean, else 1)
        # forward: per sub-layer (mixer, MLP) one all-gather in, one reduce-scatter out; the embedding
        # reduce-scatters, the LM head all-gathers; vocab-parallel CE: 2 all-reduces (max, fused sums)
        assert c["forward_all_gather"] == 2 * fwd_layers + S, (name, R, c)
        assert c["forward_reduce_scatter"] == 2 * fwd_layers + 1, (name, R, c)
        assert c["forward_all_reduce"] == 2 * S, (name, R, c)
        # backward: the conjugates, for the loops that carry gradients; no all-reduce at all
        assert c["backward_reduce_scatter"] == 2 * bwd_layers + S, (name, R, c)
        assert c["backward_all_gather"] == 2 * bwd_layers + 1, (name, R, c)
        assert c["backward_all_reduce"] == 0, (name, R, c)
        # plus the TP gradient reduction: one all-reduce per parameter whose gradient is partial per
        # shard (under SP: every replicated parameter applied to sequence shards), once per backward
        assert c["grad_hooks"] == c["hooked"] > 0, (name, R, c)
        assert c["total"] == c["grad_hooks"] + sum(v for k, v in c.items() if k.startswith(("forward_", "backward_"))), c


def test_sp_checkpointing_dropout_and_refusals(sp2):
    for rank in (0, 1):
        r = sp2[rank]["extras"]
        for key, errors in r.items():
            if isinstance(key, tuple):
                assert not errors, (key, errors[:3])
        assert r["dropout_active"] and r["dropout_loss_same_on_ranks"]
        assert r["odd_refused"] and "15" in r["odd_refused"] and "tensor_parallel=2" in r["odd_refused"]


def test_sp_bad_layouts_are_refused_at_startup():
    cfg = load_config(None, [])
    with pytest.raises(TensorParallelError, match=r"data.seq_len=15 is not divisible by parallel.tensor_parallel=2"):
        validate_tensor_parallel(cfg.model, 2, seq_len=15, sequence_parallel=True)
    with pytest.raises(ConfigError, match=r"data.seq_len=30 is not divisible by parallel.tensor_parallel=4"):
        load_config(None, ["parallel.tensor_parallel=4", "parallel.sequence_parallel=true", "data.seq_len=30"])
    with pytest.raises(ConfigError, match="pipeline_parallel 1 only"):
        load_config(None, ["parallel.tensor_parallel=2", "parallel.sequence_parallel=true",
                           "parallel.pipeline_parallel=2"])
    load_config(None, ["parallel.tensor_parallel=2", "parallel.sequence_parallel=true"])  # fine
    with pytest.raises(ConfigError, match="partition_activations"):
        load_config(None, ["parallel.tensor_parallel=2", "parallel.sequence_parallel=true",
                           "train.partition_activations=true", "train.activation_checkpointing=loop"])


def test_trainer_tp2_sequence_parallel_matches_single_rank(tmp_path):
    """End to end through the trainer (DeepSpeed, ZeRO 1, 2 accumulated micro-batches): TP = 2 with SP on
    2 ranks follows the one-rank loss trajectory; grad norms agree (the SP partial gradients of the
    replicated norms / injection / QK-norm are summed by the trainer's per-backward hooks)."""
    pytest.importorskip("deepspeed")
    from test_train_support import (assert_ok, make_byte_dataset, run_ranks, tiny_config, train_losses, train_rows,
                                    write_config)
    data = make_byte_dataset(str(tmp_path / "data" / "corpus"))
    model = {"qk_norm": True, "n_prelude": 1, "n_coda": 1, "injection": "parcae", "normalization": "inner",
             "state_init": "noise"}
    train = {"steps": 5, "grad_accum_steps": 2, "log_interval": 1}
    runs = {}
    for name, world, par in [("single", 1, {"zero_stage": 1}),
                             ("sp", 2, {"zero_stage": 1, "tensor_parallel": 2, "sequence_parallel": True})]:
        out = str(tmp_path / name)
        cfg = write_config(str(tmp_path / f"{name}.yaml"), tiny_config(data, out, model=model, train=train,
                                                                         parallel=par))
        results = run_ranks(world, ["--config", cfg], timeout=180)
        assert_ok(results)
        runs[name] = out
    a, b = train_losses(runs["single"]), train_losses(runs["sp"])
    assert sorted(a) == sorted(b) == list(range(1, 6)), (a, b)
    ra, rb = train_rows(runs["single"]), train_rows(runs["sp"])
    for s in a:
        assert a[s] == pytest.approx(b[s], rel=1e-4, abs=1e-6), (s, a[s], b[s])
        assert ra[s]["grad_norm"] == pytest.approx(rb[s]["grad_norm"], rel=1e-3), s
