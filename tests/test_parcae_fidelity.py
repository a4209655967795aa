"""Parcae as the paper and its reference code define it (docs/looped_models.md section 5; issue 13):

- the injection update u = Abar*h + Bbar*e is computed in fp32 and rounded once to the state's dtype, so
  the contraction applied is the one spectral_norm() reports (a bf16 cast of Abar applied 1.0 to every
  channel with Delta*A < 2^-9);
- the prelude's output is normalised before it is injected every loop: e = norm(P(emb(x))).
"""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from megaloop.config import ModelConfig, config_from_dict
from megaloop.model import build_model
from megaloop.model.injection import ParcaeInjection
from megaloop.model.layers import rms_norm

D = 32


def _injection(a_log, dt_bias, seed=0):
    inj = ParcaeInjection(D, math.sqrt(0.2))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        inj.A_log.copy_(torch.as_tensor(a_log, dtype=torch.float32).expand(D))
        inj.dt_bias.copy_(torch.as_tensor(dt_bias, dtype=torch.float32).expand(D))
        inj.B.add_(0.1 * torch.randn(D, D, generator=g))
    return inj


def _fp32_update(inj, s, e):
    """The spec's update from the spec's formulas, in fp64 (the fp32 update is exact to ~1e-7)."""
    delta = F.softplus(inj.dt_bias.detach().double())
    a_bar = torch.exp(-delta * torch.exp(inj.A_log.detach().double()))
    b_bar = delta[:, None] * inj.B.detach().double()
    return a_bar * s.double() + e.double() @ b_bar.T


# --- 1. |Abar| < 1 as applied ---------------------------------------------------------------------
def test_bf16_state_gets_the_fp32_update_rounded_once():
    g = torch.Generator().manual_seed(1)
    # bf16 parameters and state: DeepSpeed's bf16 engine (bf16_impl=master_weights), an exported model in bf16
    inj = _injection(torch.rand(D, generator=g) * 5 - 4, torch.rand(D, generator=g) * 8 - 6).bfloat16()
    s = torch.randn(64, D, generator=g).bfloat16()
    e = torch.randn(64, D, generator=g).bfloat16()
    with torch.no_grad():
        out = inj(s, e)
        a_bar, delta = inj.coefficients()
        ref = (a_bar * s.float() + delta * F.linear(e.float(), inj.B.float())).bfloat16()
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, ref)
    torch.testing.assert_close(out.double(), _fp32_update(inj, s, e), rtol=2 ** -8, atol=1e-6)


def test_a_bf16_state_cannot_hold_a_contraction_below_its_rounding():
    """The limit the fp32 update cannot lift: bf16 weights and state (DeepSpeed's bf16 engine, fp16, an
    exported model cast to bf16) move a state by whole bf16 ulps, so with 1 - Abar < 2^-9 (A_log = -3,
    dt_bias = -5: Abar = 0.99967) round(Abar * h) = h. The fp32-state recipe (autocast) keeps it: below."""
    inj = _injection(-3.0, -5.0).bfloat16()
    h = torch.randn(64, D, generator=torch.Generator().manual_seed(2)).bfloat16()
    with torch.no_grad():
        assert float(inj.spectral_norm()) < 0.9997
        assert torch.equal(inj(h, torch.zeros_like(h)), h)


def test_autocast_state_is_fp32_and_contracts_exactly_as_reported():
    """Under megaloop's bf16 recipe (torch.autocast over fp32 weights) the loop state is fp32; there even a
    contraction of 3e-4 per loop (A_log = -3, dt_bias = -5: Abar = 0.99967) is applied as reported, and
    Bbar*e is computed in fp32 too."""
    cfg = config_from_dict({"model": {"d_model": D, "n_heads": 4, "n_prelude": 1, "n_coda": 1, "n_loop": 1,
                                      "injection": "parcae", "normalization": "inner", "state_init": "noise"}}).model
    lm = build_model(cfg)
    inj = lm.block.injection
    with torch.no_grad():
        inj.A_log.fill_(-3.0)
        inj.dt_bias.fill_(-5.0)
    seen = []
    hook = inj.register_forward_hook(lambda m, args, out: seen.append((args[0].dtype, args[1].dtype, out.dtype)))
    tokens = torch.randint(0, cfg.vocab_size, (2, 8))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        lm(tokens, loops=2)
    hook.remove()
    assert seen and all(d == (torch.float32,) * 3 for d in seen)

    reported = float(inj.spectral_norm().detach())
    assert abs(reported - 0.9996657) < 1e-6
    g = torch.Generator().manual_seed(3)
    h = torch.randn(256, D, generator=g)
    e = torch.randn(256, D, generator=g)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out0 = inj(h, torch.zeros_like(e))
        out = inj(h, e)
    applied = out0.norm(dim=0) / h.norm(dim=0)
    assert torch.all(applied < 1)
    torch.testing.assert_close(applied, torch.full((D,), reported), rtol=0, atol=1e-6)
    torch.testing.assert_close(out.double(), _fp32_update(inj, h, e), rtol=0, atol=1e-5)


# --- 2. e = norm(P(emb(x))) ------------------------------------------------------------------------
def _parcae_cfg(**model):
    base = {"vocab_size": 50, "pad_vocab_multiple": 1, "d_model": D, "n_heads": 4, "n_kv_heads": 2,
            "max_seq_len": 16, "n_prelude": 1, "n_loop": 2, "n_coda": 1, "mlp": "relu2", "qk_norm": True,
            "injection": "parcae", "normalization": "inner", "state_init": "noise"}
    base.update(model)
    return config_from_dict({"model": base, "data": {"seq_len": 16}}).model


def test_prelude_norm_default():
    assert _parcae_cfg().use_prelude_norm
    assert _parcae_cfg(n_prelude=0, embed_norm=False).use_prelude_norm
    assert not _parcae_cfg(n_prelude=0).use_prelude_norm  # embed_norm already gives e = norm(emb(x))
    assert not _parcae_cfg(prelude_norm=False).use_prelude_norm
    assert not ModelConfig(injection="add", n_prelude=2).use_prelude_norm
    assert ModelConfig(injection="add", n_prelude=2, prelude_norm=True).use_prelude_norm
    assert "prelude_norm.weight" in build_model(_parcae_cfg()).state_dict()
    assert "prelude_norm.weight" not in build_model(_parcae_cfg(prelude_norm=False)).state_dict()


class _Scaled(nn.Module):
    def __init__(self, layer, k):
        super().__init__()
        self.layer, self.k = layer, k

    def forward(self, x, rope, **kw):
        return self.k * self.layer(x, rope, **kw)


def test_prelude_output_is_normalised_before_injection():
    torch.manual_seed(0)
    lm = build_model(_parcae_cfg())
    lm.prelude[0] = _Scaled(lm.prelude[0], 100.0)
    tokens = torch.randint(0, 50, (2, 12))
    with torch.no_grad():
        e = lm.embed(tokens, lm.rope(12, tokens.device))
    rms = e.pow(2).mean(-1).sqrt()
    torch.testing.assert_close(rms, torch.ones_like(rms), rtol=0, atol=1e-4)


def _spec_logits(lm, tokens, loops, generator):
    """docs/looped_models.md section 5, written out:
        e = norm(P(emb(x))); h(0) ~ TruncNormal(0, init_std); u(t) = Abar*h(t) + Bbar e; h(t+1) = R(u(t));
        y = head(norm(Coda(W_C h(T)))),  Abar = exp(-Delta*A), A = exp(A_log), Delta = softplus(dt_bias),
        Bbar = Delta*B.
    Only the layers (P, R, Coda) and the norm weights are taken from the model."""
    cfg = lm.cfg
    rope = lm.rope(tokens.shape[1], tokens.device)
    x = lm.embedding.weight[tokens]
    for layer in lm.prelude:
        x = layer(x, rope)
    norm_weight = lm.prelude_norm.weight if getattr(lm, "prelude_norm", None) is not None else 1.0
    e = rms_norm(x, cfg.norm_eps) * norm_weight
    std = cfg.init_std
    h = nn.init.trunc_normal_(torch.empty_like(e), std=std, a=-3 * std, b=3 * std, generator=generator)
    inj = lm.block.injection
    delta = F.softplus(inj.dt_bias)
    a_bar = torch.exp(-delta * torch.exp(inj.A_log))
    b_bar = delta[:, None] * inj.B
    for _ in range(loops):
        u = a_bar * h + e @ b_bar.T
        for layer in lm.block.layers:
            u = layer(u, rope)
        h = u
    y = h @ lm.block.out_proj.weight.T
    for layer in lm.coda:
        y = layer(y, rope)
    y = rms_norm(y, cfg.norm_eps) * lm.final_norm.weight
    return (y @ lm.embedding.weight.T)[..., : cfg.vocab_size]


@pytest.mark.parametrize("loops", [1, 3, 6])
def test_parcae_matches_the_spec_equations(loops):
    torch.manual_seed(0)
    lm = build_model(_parcae_cfg(embed_norm=False)).eval()  # the spec has no norm before the prelude
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():  # move every parameter the spec names off its init value
        if getattr(lm, "prelude_norm", None) is not None:
            lm.prelude_norm.weight.copy_(1 + 0.3 * torch.randn(D, generator=g))
        lm.final_norm.weight.copy_(1 + 0.3 * torch.randn(D, generator=g))
        lm.block.injection.A_log.copy_(torch.randn(D, generator=g))
        lm.block.injection.dt_bias.copy_(torch.randn(D, generator=g))
        lm.block.injection.B.add_(0.2 * torch.randn(D, D, generator=g))
        lm.block.out_proj.weight.add_(0.2 * torch.randn(D, D, generator=g))
    tokens = torch.randint(0, 50, (2, 12), generator=g)
    with torch.no_grad():
        got = lm(tokens, loops=loops, noise_generator=torch.Generator().manual_seed(5)).logits
        want = _spec_logits(lm, tokens, loops, torch.Generator().manual_seed(5))
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


# --- the prelude norm through the pipeline split and the exports ----------------------------------
@pytest.mark.parametrize("model", [{"n_prelude": 0, "embed_norm": False}, {"n_prelude": 2},
                                   {"injection": "add", "prelude_norm": True}])
def test_pipeline_layers_hold_the_prelude_norm_once_and_apply_it(model):
    from megaloop.parallel import pipeline as pl

    cfg = _parcae_cfg(**model)
    torch.manual_seed(0)
    lm = build_model(cfg)
    assert lm.prelude_norm is not None
    with torch.no_grad():
        lm.prelude_norm.weight.mul_(3.0)
    keys = [k for _, ks in pl.layer_state_keys(cfg) for k in (ks or [])]
    assert sorted(keys) == sorted(lm.state_dict()) and keys.count("prelude_norm.weight") == 1
    tokens, labels = torch.randint(0, 50, (2, 12)), torch.randint(0, 50, (2, 12))
    torch.manual_seed(123)  # the same noise start for both
    ref = lm(tokens, labels=labels, loops=3).loss
    torch.manual_seed(123)
    x = (tokens, torch.tensor([3, 3]))
    for layer in pl.local_layers(lm):
        x = layer(x)
    loss = pl.LoopLoss("last", lm.token_loss_fn, 0.0, False)(x, labels)
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("model", [{"n_prelude": 0, "embed_norm": False}, {"injection": "add", "prelude_norm": True},
                                   {"prelude_norm": False}])
def test_hf_export_computes_the_same_logits(tmp_path, model):
    from megaloop.export import export_hf, load_exported
    from megaloop.export.hf_files import hf_config

    cfg = config_from_dict({"model": {**_parcae_cfg(**model).__dict__, "vocab_size": 258}, "data": {"seq_len": 16}})
    assert hf_config(cfg.model).prelude_norm == cfg.model.use_prelude_norm
    torch.manual_seed(0)
    lm = build_model(cfg).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in lm.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    out = export_hf(lm.state_dict(), cfg, cfg.data, tmp_path / "hf")  # verifies logits at 1 and R loops
    hf = load_exported(out, noise_init="global_rng")
    tokens = torch.randint(0, 258, (2, 12), generator=g)
    with torch.no_grad():
        for R in (1, 4):
            torch.manual_seed(3)
            want = lm(tokens, loops=R).logits
            torch.manual_seed(3)
            got = hf(tokens, num_loops=R, use_cache=False).logits
            torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_llama_export_folds_a_prelude_norm_without_prelude_layers_and_refuses_one_after_a_prelude(tmp_path):
    from transformers import LlamaForCausalLM

    from megaloop.export import ExportError
    from megaloop.export.llama_export import export_llama

    base = {"d_model": D, "n_heads": 4, "max_seq_len": 16, "normalization": "inner", "prelude_norm": True}
    cfg = config_from_dict({"model": base, "data": {"seq_len": 16}})
    torch.manual_seed(0)
    lm = build_model(cfg).eval()
    with torch.no_grad():
        lm.prelude_norm.weight.uniform_(0.5, 2.0)
    llama = LlamaForCausalLM.from_pretrained(export_llama(lm.state_dict(), cfg, cfg.data, tmp_path / "l", loops=2))
    tokens = torch.randint(0, 258, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(llama(tokens).logits, lm(tokens, loops=2).logits, rtol=0, atol=1e-5)
    cfg = config_from_dict({"model": {**base, "n_prelude": 1}, "data": {"seq_len": 16}})
    with pytest.raises(ExportError, match="prelude_norm"):
        export_llama(build_model(cfg).state_dict(), cfg, cfg.data, tmp_path / "l2", loops=1)
