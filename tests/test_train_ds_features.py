"""DeepSpeed features around the looped block: DeepSpeed's activation checkpointing (partition /
CPU offload) as the block's checkpoint function, the DSA aux-loss gradient scale under gradient
accumulation, and Parcae's injection spectral norm in the loop diagnostics.

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
    from megaloop.training.engine import deepspeed_checkpoint_fn

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
            apply_tensor_parallel(lm, state)  # (installs the TP gradient hooks)
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
def _dsa_grads(engine, lm, tokens, gas):
    from megaloop.model.sparse_attention import set_aux_loss_backward_scale
    from megaloop.training.engine import main_loss_backward_scale
    set_aux_loss_backward_scale(lm, main_loss_backward_scale(engine))
    seen = []
    for chunk in tokens.chunk(gas):
        out = engine(chunk, labels=chunk, loops=2)
        out.loss.register_hook(lambda g: seen.append(float(g)))  # the gradient DeepSpeed sends into the loss
        engine.backward(out.loss)
    grads = {n: p.grad.detach().clone() for n, p in lm.named_parameters() if p.grad is not None}
    engine.zero_grad()
    return grads, seen


def _dsa_scale_rank(rank, world):
    _no_shm_op()
    import deepspeed
    from megaloop.config import load_config
    from megaloop.model import build_model
    from megaloop.model.sparse_attention import set_aux_loss_backward_scale
    from megaloop.parallel.topology import build_parallel_state
    from megaloop.training.engine import main_loss_backward_scale

    build_parallel_state(tensor_parallel=1)  # deepspeed.comm over the spawned gloo group
    cfg = load_config(None, ["model.vocab_size=258", "model.d_model=32", "model.n_heads=4", "model.max_seq_len=16",
                             "model.n_loop=1", "model.loops=2", "model.mixer=dsa", "model.dsa_topk=4",
                             "model.dsa_index_heads=2", "model.dsa_index_dim=8", "model.dsa_indexer_loss_coef=0.5",
                             "data.seq_len=16"])
    tokens = torch.randint(0, 256, (8, 16), generator=torch.Generator().manual_seed(0))
    out = {}
    for gas, zero, bf16 in ((1, 0, False), (2, 0, False), (2, 1, True)):
        torch.manual_seed(1)
        lm = build_model(cfg)
        lm.train()
        ds = {"train_micro_batch_size_per_gpu": 8 // gas, "gradient_accumulation_steps": gas,
              "train_batch_size": 8, "gradient_clipping": 0.0, "zero_optimization": {"stage": zero},
              "bf16": {"enabled": bf16}, "zero_allow_untested_optimizer": True, "steps_per_print": 2 ** 30}
        if bf16:
            ds["data_types"] = {"grad_accum_dtype": "fp32"}
        engine, *_ = deepspeed.initialize(model=lm, optimizer=torch.optim.SGD(lm.parameters(), lr=0.0), config=ds)
        factor = main_loss_backward_scale(engine)
        if zero == 0:
            grads, seen = _dsa_grads(engine, lm, tokens, gas)
            out[gas] = grads
            if gas == 2:  # the gradient the aux loss would get without the scale: coef, not coef / gas
                set_aux_loss_backward_scale(lm, 1.0)
                unscaled = {}
                for chunk in tokens.chunk(gas):
                    o = engine(chunk, labels=chunk, loops=2)
                    o.loss.backward()  # plain backward: main loss unscaled, like the aux loss then
                unscaled = {n: p.grad.detach().clone() for n, p in lm.named_parameters() if p.grad is not None}
                out["unscaled"] = unscaled
        else:
            o = engine(tokens[:4], labels=tokens[:4], loops=2)
            seen = []
            o.loss.register_hook(lambda g: seen.append(float(g)))
            engine.backward(o.loss)
        out[f"factor{gas}_{zero}"] = (factor, seen)
    return out


def test_dsa_indexer_gradient_follows_the_main_loss_scale_under_accumulation():
    """DeepSpeed divides the main loss by gradient_accumulation_steps; the DSA indexer's aux loss, injected
    in backward, must be scaled alike: with gas 2 (2 x 4 sequences) every gradient, the indexer's
    included, equals gas 1 (8 sequences) - and would be twice as large for the indexer otherwise."""
    out, = run_distributed(_dsa_scale_rank, world_size=1, timeout=120)
    # the scale is what DeepSpeed's backward really applies to the loss (fp32 ZeRO 0, bf16 ZeRO 1)
    for key, want in (("factor1_0", 1.0), ("factor2_0", 0.5), ("factor2_1", 0.5)):
        factor, seen = out[key]
        assert factor == want and seen and all(s == pytest.approx(factor, rel=1e-6) for s in seen), (key, out[key])
    ref, got, unscaled = out[1], out[2], out["unscaled"]
    index = [n for n in ref if "_index" in n]
    assert index and set(ref) == set(got)
    for n in ref:
        assert torch.allclose(got[n], ref[n], rtol=1e-4, atol=1e-7), f"{n}: {(got[n] - ref[n]).abs().max()}"
    for n in index:  # the indexer learns from the aux loss only: unscaled it would get 2x (coef per micro-batch)
        assert ref[n].abs().max() > 0
        assert torch.allclose(unscaled[n], 2 * ref[n], rtol=1e-4, atol=1e-7), n


# ----------------------------------------------------------------------------------------------
def test_pipeline_cpu_checkpointing_with_dropout_and_parcae_diagnostics(tmp_path):
    """PP 2 through the real trainer, dropout 0.1, Parcae injection, sampled R, 2 accumulated micro-batches:
    per-loop checkpointing with train.cpu_checkpointing (DeepSpeed's checkpoint inside the pipeline engine)
    trains exactly like no checkpointing; the injection's spectral norm reaches the console, TensorBoard
    and metrics.jsonl with the other loop diagnostics."""
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
    assert "inj spectral norm 0." in text
    from test_train_support import metrics
    sn = [r["injection_spectral_norm"] for r in metrics(runs["cpu"][0]) if "injection_spectral_norm" in r]
    assert len(sn) == 2 and all(0 < v < 1 for v in sn)  # steps 2 and 4; Parcae's A_bar is stable
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(os.path.join(runs["cpu"][0], "tensorboard"))
    acc.Reload()
    events = acc.Scalars("loops/injection_spectral_norm")
    assert [e.step for e in events] == [2, 4]
    assert [e.value for e in events] == pytest.approx(sn, rel=1e-6)
