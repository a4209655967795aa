"""DeepSpeed features around the looped block: DeepSpeed's activation checkpointing (partition /
CPU offload) as the block's checkpoint function.

Model-level checks run on spawned gloo ranks (tests/dist_utils.py); the pipeline check is a real
two-rank training run (tests/test_train_support.py).
"""
import os

import pytest
import torch

from dist_utils import run_distributed
from test_train_support import assert_ok, make_byte_dataset, run_ranks, tiny_config, train_rows, write_config

TINY = ["model.vocab_size=258", "model.d_model=32", "model.n_heads=4", "model.max_seq_len=16", "model.n_loop=2",
        "model.n_prelude=1", "model.n_coda=1", "model.loops=3", "model.arch=recurrent", "model.injection=parcae", "model.normalization=inner",
        "model.dropout=0.1", "data.seq_len=16"]


def _grads(lm, tokens, mode, fn, seed=777, loops=3, grad_loops=None):
    """Loss and every parameter's gradient of one forward/backward with dropout drawn from `seed`."""
    lm.zero_grad(set_to_none=True)
    lm.block.activation_checkpointing = mode
    if fn is not None:
        lm.block.checkpoint_fn = fn
    torch.manual_seed(seed)  # the same on both TP ranks (megaloop's rule for the default generator)
    out = lm(tokens, labels=tokens, loops=loops, grad_loops=grad_loops)
    out.loss.backward()
    return float(out.loss), {n: p.grad.detach().clone() for n, p in lm.named_parameters() if p.grad is not None}


def _same(a, b, what):
    assert set(a) == set(b), what
    for n in a:
        assert torch.allclose(a[n], b[n], rtol=1e-5, atol=1e-7), f"{what}: {n} differs by {(a[n] - b[n]).abs().max()}"


def _no_shm_op():
    """What the trainer's init_distributed does: skip DeepSpeed's CPU shared-memory op build (only
    inference_all_reduce uses it; its JIT build takes tens of seconds)."""
    import importlib
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None


def _ds_checkpointing_ranks(rank, world):
    import functools
    _no_shm_op()

    import deepspeed
    from megaloop.config import load_config
    from megaloop.model import build_model
    from megaloop.parallel.apply_tp import apply_tensor_parallel
    from megaloop.parallel.topology import build_parallel_state
    from megaloop.training.trainer import deepspeed_checkpoint_fn, install_tp_grad_hooks

    tokens = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    report = {}
    for tp, options in ((2, ["train.partition_activations=true"]),
                        (2, ["train.partition_activations=true", "train.cpu_checkpointing=true"]),
                        (1, ["train.cpu_checkpointing=true"])):
        cfg = load_config(None, TINY + [f"parallel.tensor_parallel={tp}", "train.activation_checkpointing=loop"]
                          + options)
        state = build_parallel_state(tensor_parallel=tp)
        torch.manual_seed(1)
        lm = build_model(cfg)
        if tp > 1:
            apply_tensor_parallel(lm, state)
            install_tp_grad_hooks(lm)
        lm.train()
        ds_fn, note = deepspeed_checkpoint_fn(cfg.train, state, "cpu")
        assert ds_fn is deepspeed.checkpointing.non_reentrant_checkpoint, note
        ck = deepspeed.runtime.activation_checkpointing.checkpointing
        assert ck.PARTITION_ACTIVATIONS == (tp > 1) and ck.mp_size == tp  # over the TP group, not pipe x TP
        calls = []

        def counting(function, *args, _fn=ds_fn):
            calls.append(len(args))
            return _fn(function, *args)

        default = functools.partial(torch.utils.checkpoint.checkpoint, use_reentrant=False)
        loss0, ref = _grads(lm, tokens, "none", default)
        for mode in ("loop", "layer"):
            for grad_loops in (None, 2):
                _, want = (loss0, ref) if grad_loops is None else _grads(lm, tokens, "none", default,
                                                                        grad_loops=grad_loops)
                n = len(calls)
                loss, got = _grads(lm, tokens, mode, counting, grad_loops=grad_loops)
                assert len(calls) > n and set(calls) == {1}, calls  # DeepSpeed's checkpoint ran, one tensor each
                _same(want, got, f"tp {tp} {options} {mode} grad_loops={grad_loops}")
        # dropout is live: another seed gives other gradients
        _, other = _grads(lm, tokens, "none", default, seed=778)
        assert any(not torch.allclose(other[n], ref[n]) for n in ref)
        report[f"tp{tp}:{','.join(options)}"] = (loss0, note)
    return report


def test_deepspeed_activation_checkpointing_same_gradients_with_dropout():
    """partition_activations (TP 2, with and without CPU offload) and cpu_checkpointing (TP 1), per loop
    and per layer, with dropout 0.1 and truncated backprop: DeepSpeed's non_reentrant_checkpoint
    recomputes the same dropout masks, so every gradient equals the one without checkpointing."""
    reports = run_distributed(_ds_checkpointing_ranks, world_size=2, timeout=150)
    assert reports[0]["tp2:train.partition_activations=true"][0] == pytest.approx(
        reports[1]["tp2:train.partition_activations=true"][0], rel=1e-6)  # TP ranks agree
    assert "no-op on the cpu accelerator" in reports[0]["tp1:train.cpu_checkpointing=true"][1]


# ----------------------------------------------------------------------------------------------
def test_pipeline_cpu_checkpointing_with_dropout_and_parcae_diagnostics(tmp_path):
    """PP 2 through the real trainer, dropout 0.1, Parcae injection, sampled R, 2 accumulated micro-batches:
    per-loop checkpointing with train.cpu_checkpointing (DeepSpeed's checkpoint inside the pipeline engine)
    trains exactly like no checkpointing."""
    data = make_byte_dataset(str(tmp_path / "data" / "corpus"), max_bytes=100_000)
    runs = {}
    for name, extra in (("none", {}), ("cpu", {"activation_checkpointing": "loop", "cpu_checkpointing": True})):
        out_dir = str(tmp_path / name)
        train = {"steps": 4, "grad_accum_steps": 2, "log_interval": 2, "tensorboard": name == "cpu"}
        train.update(extra)
        cfg = tiny_config(data, out_dir, train=train, parallel={"pipeline_parallel": 2, "zero_stage": 1},
                          model={"dropout": 0.1, "injection": "parcae", "normalization": "inner"},
                          loop={"sampling": "poisson", "mean": 2, "min": 1, "max": 3})
        results = run_ranks(2, ["--config", write_config(str(tmp_path / f"{name}.yaml"), cfg)], timeout=150)
        assert_ok(results)
        runs[name] = (out_dir, "".join(o for _, o in results))
    a, b = train_rows(runs["none"][0]), train_rows(runs["cpu"][0])
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for s in a:
        assert a[s]["R"] == b[s]["R"]
        assert b[s]["loss"] == pytest.approx(a[s]["loss"], rel=1e-6, abs=1e-7), s
        assert b[s]["grad_norm"] == pytest.approx(a[s]["grad_norm"], rel=1e-5), s
    text = runs["cpu"][1]
    assert "DeepSpeed activation checkpointing: cpu_checkpointing is a no-op on the cpu accelerator" in text
