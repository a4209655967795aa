"""Issue 13's model-level diagnostics (megaloop/model/fixed_point.py and the block's relative residual) on
tiny 2-layer d16 models: the Jacobian's spectral norm estimate against the exact one, the input
dependence, per-loop gradient contributions summing to the shared weights' gradient, and no cost when
the diagnostics are off."""
import glob
from pathlib import Path

import pytest
import torch

from megaloop.config import load_config
from megaloop.model import build_model
from megaloop.model.fixed_point import (input_dependence, last_iterate, loop_map_spectral_norm,
                                        per_loop_grad_contributions)

VOCAB = 258


def _model(overrides=(), seed=0):
    base = ["model.d_model=16", "model.n_heads=2", "model.n_kv_heads=1", "model.n_loop=2",
            "model.max_seq_len=16", "data.seq_len=16"]
    torch.manual_seed(seed)
    return build_model(load_config(None, base + list(overrides))).eval()


def _tokens(B=1, T=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (B, T + 1), generator=g)


ARCHES = [[], ["model.arch=flt"], ["model.injection=add"], ["model.loop_residual_gate=true"]]
ARCH_IDS = ["lt", "flt", "inject_add", "rho"]


@pytest.mark.parametrize("over", ARCHES, ids=ARCH_IDS)
def test_spectral_norm_estimate_matches_the_exact_jacobian(over):
    model = _model(over)
    if model.block.rho is not None:  # make the gate non-trivial
        with torch.no_grad():
            model.block.rho.normal_(0, 0.3)
    x = _tokens()[:, :-1]
    loops = 3
    h, e, rope = last_iterate(model, x, loops)

    def f(s):
        return model.block.loop_map(loops, s, e, rope, model.final_norm)

    J = torch.autograd.functional.jacobian(f, h).reshape(h.numel(), h.numel())
    exact = torch.linalg.matrix_norm(J, ord=2)
    est = loop_map_spectral_norm(model, x, loops, iters=16)
    assert torch.isfinite(est)
    assert abs(est.item() - exact.item()) <= 0.01 * exact.item(), (est.item(), exact.item())
    # the default (8 Lanczos steps) is within a few %; Krylov estimates converge from below
    est8 = loop_map_spectral_norm(model, x, loops)
    assert abs(est8.item() - exact.item()) <= 0.03 * exact.item(), (est8.item(), exact.item())
    assert est8.item() <= exact.item() * (1 + 1e-4)
    # deterministic for a seed
    assert loop_map_spectral_norm(model, x, loops, iters=5).item() == \
        loop_map_spectral_norm(model, x, loops, iters=5).item()


def test_last_iterate_is_the_forward_state():
    """h(R) from the factored loop map equals the block forward's carried state (same numerics)."""
    model = _model()
    x = _tokens(B=2)[:, :-1]
    h, e, rope = last_iterate(model, x, 4)
    with torch.no_grad():
        out = model.block(e, rope, 4, final_norm=model.final_norm).out
        torch.testing.assert_close(h, model.block.carry(out, model.final_norm), rtol=0, atol=0)


@pytest.mark.parametrize("over", [[], ["model.arch=flt"], ["model.state_init=noise", "model.injection=add"]],
                         ids=["lt", "flt", "noise_add"])
def test_input_dependence_finite_and_deterministic(over):
    model = _model(over)
    x = _tokens(B=2)[:, :-1]
    a = input_dependence(model, x, 4, seed=1, generator=torch.Generator().manual_seed(3))
    b = input_dependence(model, x, 4, seed=1, generator=torch.Generator().manual_seed(3))
    c = input_dependence(model, x, 4, seed=2, generator=torch.Generator().manual_seed(3))
    assert torch.isfinite(a) and a.item() > 0
    assert a.item() == b.item()
    assert a.item() != c.item()
    # a finite difference: close to the one at half the step
    half = input_dependence(model, x, 4, eps=5e-4, seed=1, generator=torch.Generator().manual_seed(3))
    assert abs(half.item() - a.item()) <= 0.05 * a.item()


@pytest.mark.parametrize("over,grad_loops", [([], None), (["model.arch=flt"], None),
                                             (["model.injection=add"], 2),
                                             (["ckpt=loop"], None), (["ckpt=layer"], None)],
                         ids=["lt", "flt", "inject_add_truncated", "ckpt_loop", "ckpt_layer"])
def test_per_loop_grad_contributions_sum_to_grad(over, grad_loops):
    ckpt = [o.split("=")[1] for o in over if o.startswith("ckpt=")]
    model = _model([o for o in over if not o.startswith("ckpt=")])
    if ckpt:  # what the training setup sets
        model.block.activation_checkpointing = ckpt[0]
    model.train()
    seq = _tokens(B=2, T=8, seed=1)
    x, y = seq[:, :-1], seq[:, 1:]
    loops = 3
    res = per_loop_grad_contributions(model, x, y, loops=loops, grad_loops=grad_loops, return_grads=True)
    # untouched .grad, block step restored
    assert all(p.grad is None for p in model.parameters())
    assert "step" not in model.block.__dict__
    out = model(x, labels=y, loops=loops, grad_loops=grad_loops)
    torch.testing.assert_close(res["loss"], out.loss.detach(), rtol=0, atol=0)
    out.loss.backward()
    params = dict(model.block.named_parameters())
    for name, per in res["grads"].items():
        torch.testing.assert_close(per.sum(0), params[name].grad, rtol=0, atol=1e-6)
    n_layers = model.cfg.n_loop
    assert res["groups"][:n_layers] == [f"layer{i}" for i in range(n_layers)]
    assert res["grad_norm"].shape == (loops, len(res["groups"]))
    assert torch.isnan(res["grad_cosine"][0]).all()
    if grad_loops is None:
        assert (res["grad_norm"] > 0).all()
        assert ((res["grad_cosine"][1:].abs() <= 1 + 1e-9)).all()
    else:  # loops without gradients contribute nothing
        assert (res["grad_norm"][: loops - grad_loops] == 0).all()
        assert (res["grad_norm"][loops - grad_loops:] > 0).all()
    # a manual cosine for one (loop, layer)
    g = res["grads"]
    members = [n for n in g if n.startswith("layers.1.")]
    v1 = torch.cat([g[n][1].reshape(-1) for n in members]).double()
    v2 = torch.cat([g[n][2].reshape(-1) for n in members]).double()
    if v1.norm() > 0:
        torch.testing.assert_close(res["grad_cosine"][2, 1].item(),
                                   (v1 @ v2 / (v1.norm() * v2.norm())).item(), rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(res["grad_norm"][2, 1].item(), v2.norm().item(), rtol=1e-9, atol=0)


@pytest.mark.parametrize("over", [[], ["model.arch=flt"], ["model.normalization=inner"]],
                         ids=["lt", "flt", "inner"])
def test_relative_residual_matches_manual(over):
    model = _model(over)
    x = _tokens(B=2)[:, :-1]
    loops = 4
    with torch.no_grad():
        d = model(x, loops=loops, return_diagnostics=True).diagnostics
        e, rope = model.embed(x, model.rope(x.shape[1], x.device)), model.rope(x.shape[1], x.device)
        blk = model.block
        s = blk.initial_state(e) if blk.arch == "recurrent" else e
        want = []
        for t in range(loops):
            h = blk.loop_map(t, s, e, rope, model.final_norm)
            prev = s if (blk.arch == "recurrent" or t > 0) else torch.zeros_like(s)
            want.append(((h - prev).norm(dim=-1) / h.norm(dim=-1)).mean())
            s = h
    assert d["relative_residual"].shape == (loops,)
    torch.testing.assert_close(d["relative_residual"], torch.stack(want), rtol=1e-5, atol=1e-7)


def test_diagnostics_cost_no_extra_layer_calls():
    model = _model()
    calls = []
    hooks = [m.register_forward_hook(lambda *a: calls.append(1)) for m in model.block.layers]
    x = _tokens()[:, :-1]
    with torch.no_grad():
        model(x, loops=3)
        off = len(calls)
        calls.clear()
        out = model(x, loops=3, return_diagnostics=True)
        on = len(calls)
        calls.clear()
        assert model(x, loops=3).diagnostics is None
    for h in hooks:
        h.remove()
    assert off == on == 3 * model.cfg.n_loop
    assert set(out.diagnostics) >= {"residual_norm", "state_norm", "state_delta", "relative_residual"}


TINY = sorted(glob.glob(str(Path(__file__).resolve().parents[1] / "yaml_configs/tiny/*.yaml")))


@pytest.mark.parametrize("path", TINY, ids=[Path(p).stem for p in TINY])
def test_per_loop_grad_contributions_sum_to_grad_every_tiny_config(path):
    """Every variant (injections, Ouro's shared final norm, Parcae, noise starts, mixers): the per-loop
    contributions sum to the shared block parameters' gradient (same noise start for both passes)."""
    torch.manual_seed(0)
    model = build_model(load_config(path)).eval()  # eval: no dropout draws between the two passes
    seq = _tokens(B=2, T=16, seed=2)
    x, y = seq[:, :-1], seq[:, 1:]
    res = per_loop_grad_contributions(model, x, y, loops=3, return_grads=True,
                                      noise_generator=torch.Generator().manual_seed(5))
    model(x, labels=y, loops=3, noise_generator=torch.Generator().manual_seed(5)).loss.backward()
    params = dict(model.block.named_parameters())
    for name, per in res["grads"].items():
        grad = params[name].grad
        if grad is None:  # outside the loss's graph (DSA's indexer: its own KL loss): no contributions
            assert not per.any(), name
        else:
            torch.testing.assert_close(per.sum(0), grad, rtol=0, atol=1e-6)
