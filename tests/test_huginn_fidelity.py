"""Huginn as in its reference code (seal-rg/recurrent-pretraining, raven_modeling_minimal.py), issue 13 item 4.

The reference's block normalises the stream itself, x = N2(x + Attn(N1 x)); x = N4(x + MLP(N3 x))
(norm_style huginn; Ouro's sandwich is x + N(f(N x))); its final norm is applied to the loop's output
before the coda as well as after it (coda_norm); the embedding is multiplied by sqrt(d) and the random
initial state is drawn on the embedding's scale (embed_scale, state_init_std in yaml_configs/tiny/huginn.yaml).
The references below are written from those equations, using the model's attention / MLP / adapter
modules as the sub-layer functions f and computing every norm here.
"""
import math
from pathlib import Path

import pytest
import torch

from megaloop.config import ConfigError, ModelConfig, load_config
from megaloop.export.llama_export import llama_unrepresentable
from megaloop.model import build_model
from megaloop.model.layers import TransformerLayer, rope_cache
from megaloop.parallel import pipeline as pl

EPS = 1e-6
HUGINN = str(Path(__file__).resolve().parents[1] / "yaml_configs/tiny/huginn.yaml")


def _norm(x, w):
    """RMSNorm written out: x / rms(x) * w."""
    return x / x.pow(2).mean(-1, keepdim=True).add(EPS).sqrt() * w


def _nudge(module, seed=0, scale=0.1):
    """Move every parameter off its init, so unit norm scales take part."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return module


def _ref_layer(layer, x, rope):
    """Huginn's SandwichBlock.forward: x = N2(x + Attn(N1 x)); x = N4(x + MLP(N3 x))."""
    x = _norm(x + layer.mixer(_norm(x, layer.attn_norm.weight), rope), layer.attn_post_norm.weight)
    return _norm(x + layer.mlp(_norm(x, layer.mlp_norm.weight)), layer.mlp_post_norm.weight)


def _small(style="huginn", **kw):
    return ModelConfig(d_model=32, n_heads=4, vocab_size=100, max_seq_len=16, norm_style=style, **kw)


def test_huginn_layer_equals_the_reference_equations_and_differs_from_sandwich():
    torch.manual_seed(0)
    cfg = _small()
    layer = _nudge(TransformerLayer(cfg)).eval()
    x = torch.randn(2, 12, 32) * 3
    rope = rope_cache(12, cfg.attn_head_dim, cfg.rope_theta)
    with torch.no_grad():
        got = layer(x, rope)
        ref = _ref_layer(layer, x, rope)
        sandwich = TransformerLayer(_small("sandwich")).eval()
        sandwich.load_state_dict(layer.state_dict())  # same parameters, Ouro's form
        old = sandwich(x, rope)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    assert (old - ref).abs().max() > 0.1  # the sandwich path is not Huginn's block
    # the stream leaving a huginn layer is normalised: unit RMS before the last norm's scale
    rms = (got / layer.mlp_post_norm.weight).pow(2).mean(-1).sqrt()
    torch.testing.assert_close(rms, torch.ones_like(rms), rtol=1e-4, atol=1e-4)


def _ref_forward(lm, tokens, loops, s0):
    """Huginn's RavenForCausalLM.forward from its equations: e = prelude(wte(x) * sqrt(d)); s = s0;
    s = core(adapter([s; e])) per loop; x = ln(s); x = coda(x); logits = head(ln_f(x))."""
    cfg = lm.cfg
    rope = lm.rope(tokens.shape[1], tokens.device)
    e = lm.embedding(tokens) * math.sqrt(cfg.d_model)
    for layer in lm.prelude:
        e = _ref_layer(layer, e, rope)
    s = s0
    for _ in range(loops):
        s = lm.block.injection.adapter(torch.cat([s, e], dim=-1))
        for layer in lm.block.layers:
            s = _ref_layer(layer, s, rope)
    x = _norm(s, lm.coda_norm.weight)
    for layer in lm.coda:
        x = _ref_layer(layer, x, rope)
    return lm.head(_norm(x, lm.final_norm.weight))[..., : cfg.vocab_size]


def test_tiny_huginn_model_equals_the_reference_forward():
    cfg = load_config(HUGINN)
    torch.manual_seed(0)
    lm = _nudge(build_model(cfg), scale=0.05).eval()
    assert lm.coda_norm is not None and lm.coda_norm.weight.shape == (cfg.model.d_model,)
    tokens = torch.randint(0, 258, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for R in (1, 3):
            g = torch.Generator().manual_seed(5)
            got = lm(tokens, loops=R, noise_generator=g).logits
            std = cfg.model.state_init_std
            s0 = torch.nn.init.trunc_normal_(torch.empty(2, 16, cfg.model.d_model), std=std, a=-3 * std,
                                             b=3 * std, generator=torch.Generator().manual_seed(5))
            torch.testing.assert_close(got, _ref_forward(lm, tokens, R, s0), rtol=1e-4, atol=1e-4)


def test_coda_norm_is_off_by_default_and_changes_the_logits_when_on():
    assert ModelConfig().coda_norm is False and ModelConfig().embed_scale == 1.0
    torch.manual_seed(0)
    base = build_model(load_config(None, ["model.d_model=32", "model.n_coda=1", "model.injection=add",
                                          "model.normalization=inner", "model.vocab_size=100"]))
    assert base.coda_norm is None and not any(k.startswith("coda_norm") for k in base.state_dict())
    on = build_model(load_config(None, ["model.d_model=32", "model.n_coda=1", "model.injection=add",
                                        "model.normalization=inner", "model.vocab_size=100", "model.coda_norm=true"]))
    missing, unexpected = on.load_state_dict(base.state_dict(), strict=False)
    assert missing == ["coda_norm.weight"] and not unexpected  # an old checkpoint lacks only this
    tokens = torch.randint(0, 100, (2, 16))
    with torch.no_grad():
        a, b = base(tokens, loops=3).logits, on(tokens, loops=3).logits
        assert (a - b).abs().max() > 1e-3  # a pre-norm loop output is not unit-RMS: the norm acts
        on.coda_norm.weight.mul_(2.0)
        assert (on(tokens, loops=3).logits - b).abs().max() > 1e-3


def test_embed_scale_multiplies_the_embedding():
    cfg = load_config(None, ["model.d_model=32", "model.vocab_size=100", "model.embed_norm=false"])
    torch.manual_seed(0)
    lm = build_model(cfg)
    scaled = build_model(load_config(None, ["model.d_model=32", "model.vocab_size=100", "model.embed_norm=false",
                                            "model.embed_scale=4.0"]))
    scaled.load_state_dict(lm.state_dict())
    tokens = torch.randint(0, 100, (2, 8))
    rope = lm.rope(8, tokens.device)
    with torch.no_grad():
        torch.testing.assert_close(scaled.embed(tokens, rope), 4.0 * lm.embedding(tokens))


def test_huginn_yaml_starts_the_state_on_the_embeddings_scale():
    cfg = load_config(HUGINN)
    m = cfg.model
    assert m.norm_style == "huginn" and m.coda_norm and not m.embed_norm
    assert m.embed_scale == pytest.approx(math.sqrt(m.d_model))
    assert m.init_std == pytest.approx(math.sqrt(2 / (5 * m.d_model)), rel=1e-5)  # Huginn's sigma
    torch.manual_seed(0)
    lm = build_model(cfg)
    with torch.no_grad():
        emb_rms = (lm.embedding.weight[: m.vocab_size] * m.embed_scale).pow(2).mean().sqrt().item()
        s0 = lm.block.initial_state(torch.zeros(16, 64, m.d_model), torch.Generator().manual_seed(0))
        s0_rms = s0.pow(2).mean().sqrt().item()
    assert emb_rms == pytest.approx(math.sqrt(2 / 5), rel=0.03)
    assert s0_rms == pytest.approx(emb_rms, rel=0.05)  # trunc at 3 sigma: 0.987 sigma


@pytest.mark.parametrize("n_coda", [1, 0])
def test_pipeline_layers_apply_the_embed_scale_and_coda_norm(n_coda):
    cfg = load_config(HUGINN, [f"model.n_coda={n_coda}", "loop.loss=mean"])
    torch.manual_seed(0)
    lm = _nudge(build_model(cfg), scale=0.05)
    tokens = torch.randint(0, 258, (2, 16))
    labels = torch.randint(0, 258, (2, 16))
    torch.manual_seed(3)
    ref = lm(tokens, labels=labels, loops=3, grad_loops=2).loss
    x = (tokens, torch.tensor([3, 2]))
    torch.manual_seed(3)
    for layer in pl.local_layers(lm, collect=True):
        x = layer(x)
    loss = pl.LoopLoss("mean", lm.token_loss_fn, cfg.loop.exit_entropy_weight, True)(x, labels)
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("overrides,match", [
    (["model.embed_scale=8"], "embed_norm"),
    (["model.coda_norm=true", "model.norm_style=sandwich", "model.share_outer_final_norm=true"], "coda_norm"),
    (["model.norm_style=huginm"], "norm_style"),
])
def test_bad_combinations_are_refused(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, overrides)


def test_llama_export_refuses_the_huginn_options():
    why = " ".join(llama_unrepresentable(load_config(HUGINN).model, 1))
    assert "embed_scale" in why and "coda_norm" in why and "norm_style='huginn'" in why
