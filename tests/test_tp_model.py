"""Tensor parallelism on the whole looped family: TP = 2 (two gloo ranks) equals TP = 1.

All checks run inside ONE spawned 2-rank job (spawning costs seconds); the individual tests below
read its results. On every rank the reference TP = 1 model and the TP = 2 shard are built from the
same seed, so they start from the same full weights.

Tolerances (fp32): logits and loss atol 2e-5 / rtol 1e-5; gradients atol 1e-6 (+ rtol 1e-4), after
the TP gradient hooks that apply_tensor_parallel installs; the differences come only from the order of partial sums in the all-reduces.
"""
import glob
import math
from pathlib import Path

import pytest
import torch

from dist_utils import run_distributed
from megaloop.config import ConfigError, ParallelConfig, load_config
from megaloop.model import build_model
from megaloop.parallel.apply_tp import (TensorParallelError, apply_tensor_parallel, merge_tp_shards,
                                        partition_info_for, shard_state_dict, tp_partition_info,
                                        validate_tensor_parallel)
from megaloop.parallel.comm import TPComm
from megaloop.parallel.tensor_parallel import partition_of

ROOT = Path(__file__).resolve().parents[1]
TINY = sorted(glob.glob(str(ROOT / "yaml_configs/tiny/*.yaml")))
LOGIT_TOL = dict(atol=2e-5, rtol=1e-5)
GRAD_TOL = dict(atol=1e-6, rtol=1e-4)
SMALL = ["model.max_seq_len=16", "data.seq_len=16"]

# Variants beyond the shipped tiny configs: kv heads replicated (fewer kv heads than TP ranks),
# per-loop losses, untied head, soft-capped logits, QK-norm with kv replication, internal recall at
# every layer, attention gate + FLT, bidirectional attention (model.causal=false) + FLT.
EXTRA = {
    "kv_replicated": ("lt.yaml", ["model.n_kv_heads=1"]),
    "kv_repl_qknorm_flt": ("flt.yaml", ["model.n_kv_heads=1", "model.qk_norm=true", "model.attn_output_gate=true"]),
    "mean_loss_untied_softcap": ("inject_add.yaml", ["loop.loss=mean", "model.tie_embeddings=false",
                                                     "model.logit_softcap=5.0"]),
    "internal_all_relu2": ("inject_internal.yaml", ["model.internal_recall_layers=all", "model.mlp=relu2"]),
    "noncausal_flt": ("flt.yaml", ["model.causal=false", "data.task=sudoku"]),
}


def _cases():
    cases = {Path(p).stem: (p, []) for p in TINY}
    for name, (base, over) in EXTRA.items():
        cases[name] = (str(ROOT / "yaml_configs/tiny" / base), over)
    return cases


def _batch(B=2, T=16, seed=0, vocab=258):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, vocab, (B, T + 1), generator=g)
    y = x[:, 1:].clone()
    y[0, :3] = -100  # ignored labels
    return x[:, :-1], y


def _close(a, b, tol):
    try:
        torch.testing.assert_close(a, b, **tol)
        return None
    except AssertionError as e:
        return str(e).splitlines()[0:4]


# ---------------------------------------------------------------------------------------------
# The job: everything a rank does


def _compare(model, ref, x, y, R, G, kw):
    """One TP-vs-reference step: logits, loss, exit loops and every gradient (gathered) compared; also
    whether the replicated parameters' gradients are identical on the TP ranks. Shared with the
    sequence-parallel tests."""
    from megaloop.parallel.apply_tp import gather_full_grads, gather_logits
    res = {"errors": []}
    torch.manual_seed(1)
    o_ref = ref(x, labels=y, loops=R, grad_loops=G, **kw)
    o_ref.loss.backward()
    torch.manual_seed(1)
    o_tp = model(x, labels=y, loops=R, grad_loops=G, **kw)
    o_tp.loss.backward()  # (partial gradients summed over TP by the hooks apply_tensor_parallel installed)
    logits = gather_logits(model, o_tp.logits)
    res["logits_shape"] = tuple(logits.shape)
    res["local_vocab"] = o_tp.logits.shape[-1]
    res["max_logit_diff"] = (logits - o_ref.logits).abs().max().item()
    for what, a, b, tol in [("logits", logits, o_ref.logits, LOGIT_TOL),
                            ("loss", o_tp.loss.detach(), o_ref.loss.detach(), LOGIT_TOL)]:
        err = _close(a, b, tol)
        if err:
            res["errors"].append((what, err))
    if o_ref.exit_loops is not None and not torch.equal(o_ref.exit_loops, o_tp.exit_loops):
        res["errors"].append(("exit_loops", "differ"))
    grads = gather_full_grads(model)
    ref_grads = dict(ref.named_parameters())
    res["max_grad_diff"] = 0.0
    assert set(grads) == set(ref_grads), (set(grads) ^ set(ref_grads))
    for pname, g in grads.items():
        rg = ref_grads[pname].grad
        if (g is None) != (rg is None):
            res["errors"].append((pname, "grad presence differs"))
            continue
        if g is None:
            continue
        res["max_grad_diff"] = max(res["max_grad_diff"], (g - rg).abs().max().item())
        err = _close(g, rg, GRAD_TOL)
        if err:
            res["errors"].append((pname, err))
    # Replicated grads are identical on both TP ranks (no extra all-reduce needed for them).
    rep = torch.cat([p.grad.flatten() for p in model.parameters()
                     if p.grad is not None and not partition_of(p).sharded])
    both = model.tp_comm.all_gather(rep[None], dim=0)
    res["replicated_grad_rank_diff"] = (both[0] - both[1]).abs().max().item()
    return res


def _equivalence(rank, state, comm_counts):
    from megaloop.parallel.apply_tp import gather_full_state_dict
    out = {}
    for name, (path, over) in _cases().items():
        cfg = load_config(path, SMALL + over)
        R = 3
        G = cfg.loop.backprop_loops  # truncated backprop where the config has it
        torch.manual_seed(0)
        ref = build_model(cfg)
        torch.manual_seed(0)
        model = apply_tensor_parallel(build_model(cfg), state)
        x, y = _batch()
        kw = dict(exit="q_exit", exit_threshold=0.6) if cfg.model.exit_gate else {}
        res = _compare(model, ref, x, y, R, G, kw)
        if cfg.model.exit_gate:  # Huginn's KL exit needs a full-vocabulary KL: vocab-parallel here
            with torch.no_grad():
                a = model(x, loops=4, exit="kl", exit_threshold=0.0)
                b = ref(x, loops=4, exit="kl", exit_threshold=0.0)
                kl_tp = model.successive_kl_fn(torch.stack(a.per_loop_logits))
                kl_ref = ref.successive_kl_fn(torch.stack(b.per_loop_logits))
                thr = kl_ref.flatten().median().item()  # half the (token, loop) pairs pass
                a = model(x, loops=4, exit="kl", exit_threshold=thr)
                b = ref(x, loops=4, exit="kl", exit_threshold=thr)
            res["kl_err"] = (kl_tp - kl_ref).abs().max().item()
            res["kl_exit_equal"] = bool(torch.equal(a.exit_loops, b.exit_loops))
            res["kl_exit_spread"] = int(b.exit_loops.unique().numel())
        # Gathered weights = the reference weights; shards merge back offline to the same state dict.
        full = gather_full_state_dict(model)
        res["state_dict_equal"] = all(torch.equal(full[k], v) for k, v in ref.state_dict().items()) and \
            set(full) == set(ref.state_dict())
        res["shard"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        res["ref"] = {k: v.detach().clone() for k, v in ref.state_dict().items()} if rank == 0 else None
        out[name] = res
    return out


def _vocab_parallel_ce(rank, state):
    from megaloop.model.loop_losses import token_cross_entropy
    from megaloop.parallel.apply_tp import MaskPaddedVocab
    from megaloop.parallel.cross_entropy import vocab_parallel_cross_entropy
    comm = TPComm.from_state(state)
    g = torch.Generator().manual_seed(3)
    V, Vp = 258, 320
    full = torch.randn(3, 7, Vp, generator=g) * 4
    labels = torch.randint(0, V, (3, 7), generator=g)
    labels[1, 2] = -100
    labels[2, 0] = V - 1  # last real id, on the last shard next to the padding
    ref_logits = full[..., :V].clone().requires_grad_(True)
    ref = token_cross_entropy(ref_logits, labels)
    w = torch.rand(3, 7, generator=g)
    (ref * w).sum().backward()
    n = Vp // comm.size
    local = full[..., rank * n:(rank + 1) * n].clone().requires_grad_(True)
    masked = MaskPaddedVocab(rank * n, V)(local)
    with comm.counting() as c:
        loss = vocab_parallel_cross_entropy(masked, labels, comm, rank * n)
        (loss * w).sum().backward()
    gfull = comm.all_gather(local.grad, dim=-1)[..., :V]
    return dict(loss_err=(loss - ref).abs().max().item(), grad_err=(gfull - ref_logits.grad).abs().max().item(),
                pad_grad=local.grad[..., max(0, V - rank * n):].abs().max().item() if rank == 1 else 0.0,
                counts=c.summary())


def _scored_loops(cfg, R: int) -> int:
    """How many loops' outputs go through the LM head and the loss: R under loop.loss: mean, else the last."""
    assert cfg.loop.loss in ("last", "mean"), cfg.loop.loss
    return R if cfg.loop.loss == "mean" else 1


def _counting(rank, state):
    """Collectives per forward/backward for given R: 2 fwd + 2 bwd all-reduces per layer per loop."""
    out = {}
    for name, R, G in [("lt", 1, None), ("lt", 4, None), ("flt", 3, None), ("parcae", 5, 2), ("lt2_gdn", 2, None)]:
        cfg = load_config(ROOT / f"yaml_configs/tiny/{name}.yaml", SMALL)
        torch.manual_seed(0)
        model = apply_tensor_parallel(build_model(cfg), state)
        x, y = _batch()
        with model.tp_comm.counting() as c:
            model(x, labels=y, loops=R, grad_loops=G).loss.backward()
        m = cfg.model
        out[(name, R, G)] = dict(fwd=c.count("all_reduce", "forward"), bwd=c.count("all_reduce", "backward"),
                                 other=c.count() - c.count("all_reduce"), L=m.n_loop, P=m.n_prelude, C=m.n_coda,
                                 S=_scored_loops(cfg, R),
                                 fwd_bytes=c.payload_bytes(phase="forward"), bwd_bytes=c.payload_bytes(phase="backward"))
    return out


def _dropout_rng(rank, state):
    """Dropout under TP: forked masks differ across TP ranks, the rest agree, recompute replays."""
    from megaloop.parallel.apply_tp import gather_full_grads
    from megaloop.parallel.random import RNGTracker, check_rng_in_step, rng_fingerprint
    comm = TPComm.from_state(state)
    res = {}
    tracker = RNGTracker(tp_rank=state.tp_rank, dp_rank=state.dp_rank)
    torch.manual_seed(5)
    with tracker.fork():
        inside = torch.rand(8)
    outside = torch.rand(8)
    both_in = comm.all_gather(inside[None], dim=0)
    both_out = comm.all_gather(outside[None], dim=0)
    res["fork_differs"] = not torch.equal(both_in[0], both_in[1])
    res["outside_same"] = torch.equal(both_out[0], both_out[1])
    check_rng_in_step(comm)  # raises if the default generators diverged
    # Recompute under activation checkpointing reproduces the masks: same grads as no checkpointing.
    grads = {}
    for path, over in [("lt.yaml", []), ("huginn.yaml", [])]:
        cfg = load_config(ROOT / "yaml_configs/tiny" / path, SMALL + ["model.dropout=0.2"] + over)
        torch.manual_seed(0)
        model = apply_tensor_parallel(build_model(cfg), state).train()
        x, y = _batch()
        for mode in ("none", "loop", "layer"):
            model.zero_grad()
            model.block.activation_checkpointing = mode
            torch.manual_seed(11)
            model(x, labels=y, loops=3).loss.backward()
            grads[(path, mode)] = gather_full_grads(model)
        # Dropout really is active, and the default generator is still in step after training steps.
        torch.manual_seed(12)
        l1 = model(x, labels=y, loops=3).loss.item()
        torch.manual_seed(13)
        l2 = model(x, labels=y, loops=3).loss.item()
        res[f"{path}_dropout_active"] = l1 != l2
        check_rng_in_step(comm)
        # The random initial state (Huginn) is identical on both TP ranks after dropout ran.
        e = model.embed(x, model.rope(x.shape[1], x.device))
        s0 = model.block.initial_state(e)
        both = comm.all_gather(s0.detach()[None], dim=0)
        res[f"{path}_init_state_same"] = torch.equal(both[0], both[1]) and cfg.model.state_init in ("noise", "embed")
    res["ckpt_grad_diff"] = max(
        (grads[(p, m)][k] - grads[(p, "none")][k]).abs().max().item()
        for p in ("lt.yaml", "huginn.yaml") for m in ("loop", "layer") for k in grads[(p, "none")]
        if grads[(p, "none")][k] is not None)
    # initial_state_sync="broadcast": identical noise even when the ranks were seeded differently.
    cfg = load_config(ROOT / "yaml_configs/tiny/parcae.yaml", SMALL)
    torch.manual_seed(0)
    model = apply_tensor_parallel(build_model(cfg), state, initial_state_sync="broadcast")
    x, _ = _batch()
    torch.manual_seed(100 + rank)  # deliberately out of step
    e = model.embed(x, model.rope(x.shape[1], x.device))
    with model.tp_comm.counting() as c:
        s0 = model.block.initial_state(e)
    both = comm.all_gather(s0.detach()[None], dim=0)
    res["broadcast_init_same"] = torch.equal(both[0], both[1]) and c.count("broadcast") == 1
    return res


def _job(rank, world):
    from megaloop.parallel import build_parallel_state
    state = build_parallel_state(ParallelConfig(tensor_parallel=2))
    assert state.tp_size == 2
    return dict(equivalence=_equivalence(rank, state, None), ce=_vocab_parallel_ce(rank, state),
                counting=_counting(rank, state), rng=_dropout_rng(rank, state))


@pytest.fixture(scope="module")
def tp2():
    return run_distributed(_job, world_size=2, timeout=240)


# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", sorted(_cases()))
def test_tp2_equals_tp1_logits_loss_grads(tp2, arch):
    for rank in (0, 1):
        r = tp2[rank]["equivalence"][arch]
        assert not r["errors"], (arch, rank, r["errors"][:3])
        assert r["logits_shape"][-1] == 258 and r["local_vocab"] == 160  # 320 padded / 2
        assert r["replicated_grad_rank_diff"] == 0.0, r["replicated_grad_rank_diff"]
        assert r["state_dict_equal"]
        if "kl_exit_equal" in r:
            assert r["kl_exit_equal"] and r["kl_exit_spread"] > 1 and r["kl_err"] < 1e-6, r["kl_err"]


def test_tp_shards_merge_offline_into_the_full_state_dict(tp2):
    for arch, (path, over) in _cases().items():
        cfg = load_config(path, SMALL + over)
        info = partition_info_for(cfg.model, 2)
        shards = [tp2[r]["equivalence"][arch]["shard"] for r in (0, 1)]
        ref = tp2[0]["equivalence"][arch]["ref"]
        merged = merge_tp_shards(shards, info)
        assert set(merged) == set(ref), arch
        for k in ref:
            assert torch.equal(merged[k], ref[k]), (arch, k)
        for r in (0, 1):
            again = shard_state_dict(ref, info, r, 2)
            assert all(torch.equal(again[k], shards[r][k]) for k in ref), (arch, r)


def test_vocab_parallel_cross_entropy_equals_the_ordinary_one(tp2):
    for rank in (0, 1):
        r = tp2[rank]["ce"]
        assert r["loss_err"] < 1e-5 and r["grad_err"] < 1e-6, r
        # forward: one max all-reduce + one fused (target, sum-exp) all-reduce; backward: nothing
        assert r["counts"] == {"forward/all_reduce": (2, 3 * 7 * 4 * 3)}, r["counts"]
    assert tp2[1]["ce"]["pad_grad"] == 0.0


def test_collective_count_per_forward_backward(tp2):
    for (name, R, G), c in tp2[0]["counting"].items():
        G = R if G is None else G
        L, P, C, S = c["L"], c["P"], c["C"], c["S"]
        # forward: embedding g + 2 per layer per loop + vocab-parallel CE (max, fused sums) per scored loop
        assert c["fwd"] == 1 + 2 * (P + L * R + C) + 2 * S, (name, R, c)
        # backward: 2 per layer per loop that carries gradients + the LM head's f per scored loop
        assert c["bwd"] == 2 * (P + L * G + C) + S, (name, R, c)
        assert c["other"] == 0, (name, R, c)


def test_dropout_rng_tracker_and_recompute(tp2):
    for rank in (0, 1):
        r = tp2[rank]["rng"]
        assert r["fork_differs"] and r["outside_same"]
        assert r["lt.yaml_dropout_active"] and r["huginn.yaml_dropout_active"]
        assert r["ckpt_grad_diff"] <= 1e-6, r["ckpt_grad_diff"]
        assert r["huginn.yaml_init_state_same"] and r["lt.yaml_init_state_same"]
        assert r["broadcast_init_same"]


# ---------------------------------------------------------------------------------------------
# Bad input, in one process (no group needed)


@pytest.mark.parametrize("over, tp, words", [
    (["model.n_heads=6", "model.n_kv_heads=6", "model.d_model=48"], 4, ["n_heads=6", "tensor_parallel=4"]),
    (["model.n_heads=12", "model.n_kv_heads=6", "model.d_model=96"], 4, ["n_kv_heads=6", "tensor_parallel=4"]),
    (["model.ffn_hidden=100"], 8, ["MLP hidden size 100", "tensor_parallel=8"]),
    (["model.pad_vocab_multiple=2"], 4, ["padded vocabulary 258", "vocab_size=258", "pad_vocab_multiple=4"]),
])
def test_bad_tp_degree_is_refused_naming_the_numbers(over, tp, words):
    cfg = load_config(None, over)
    with pytest.raises(TensorParallelError) as err:
        validate_tensor_parallel(cfg.model, tp)
    for w in words:
        assert w in str(err.value), str(err.value)
    # the same refusal at the parallelize step, before anything is changed
    model = build_model(cfg.model)
    with pytest.raises(TensorParallelError):
        apply_tensor_parallel(model, TPComm(None, 0, tp))
    # and at config load time
    with pytest.raises(ConfigError):
        load_config(None, over + [f"parallel.tensor_parallel={tp}"])


def test_partition_info_names_every_sharded_weight():
    cfg = load_config(ROOT / "yaml_configs/tiny/lt2_hybrid.yaml")
    info = partition_info_for(cfg.model, 4)
    kinds = {k: v.kind for k, v in info.items()}
    assert kinds["embedding.weight"] == kinds["head.weight"] == "vocab"
    assert kinds["block.layers.0.mlp.w1.weight"] == "column" and kinds["block.layers.0.mlp.w2.weight"] == "row"
    assert any(k.endswith("mixer.wk.weight") and v == "kv_replicated" for k, v in kinds.items())  # kv 2 < tp 4
    assert kinds["final_norm.weight"] == "replicated"
