"""model.value_embeddings (Parcae's reference, from karpathy/nanochat; issue 13 item 3): which layers own a
table, the gated update of the attention values against a reference written here from the formulas,
the whole model with the tables at zero equal to the model without them, and the refusals (tensor /
pipeline parallelism, non-attention mixers, the Llama export); the Hugging Face export equals megaloop."""
import math

import pytest
import torch
import torch.nn.functional as F

from megaloop.config import ConfigError, config_from_dict
from megaloop.model import build_model
from megaloop.model.layers import rms_norm
from megaloop.model.value_embeddings import has_value_embedding, value_embedding_layers

V, T = 64, 8


def _cfg(model=None, parallel=None):
    m = {"d_model": 48, "n_heads": 4, "n_kv_heads": 2, "n_prelude": 1, "n_loop": 2, "n_coda": 2, "vocab_size": V,
         "max_seq_len": T, "mlp": "relu2", "injection": "parcae", "normalization": "inner", "state_init": "embed",
         "value_embeddings": True}
    m.update(model or {})
    return config_from_dict({"model": m, "data": {"seq_len": T}, "parallel": parallel or {}})


def _randomise(lm, seed=0):
    """Weights far from init (gates and tables included), so every term is visible in the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lm.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g))


def test_alternate_layers_own_a_table_the_last_always():
    # n layers counted over prelude + loop + coda, not unrolled; layer i has one iff i = n-1 (mod 2)
    assert [i for i in range(5) if has_value_embedding(i, 5)] == [0, 2, 4]
    assert [i for i in range(6) if has_value_embedding(i, 6)] == [1, 3, 5]
    cfg = _cfg().model  # 1 + 2 + 2 = 5 layers
    assert list(value_embedding_layers(cfg)) == [("prelude", 0), ("loop", 1), ("coda", 1)]
    cfg = _cfg({"n_prelude": 2, "n_loop": 3, "n_coda": 1}).model  # 6 layers: 1, 3, 5
    assert list(value_embedding_layers(cfg)) == [("prelude", 1), ("loop", 1), ("coda", 0)]
    lm = build_model(_cfg())
    keys = sorted(k for k in lm.state_dict() if "value_embed" in k)
    assert keys == sorted(f"{p}.mixer.value_embed.{w}.weight" for p in ("prelude.0", "block.layers.1", "coda.1")
                          for w in ("table", "gate"))
    ve = lm.coda[1].mixer.value_embed
    assert ve.table.weight.shape == (lm.cfg.padded_vocab_size, 2 * 12)  # kv heads x head dim
    assert ve.gate.weight.shape == (2, 32)  # min(32, d) channels -> one gate per kv head
    assert torch.count_nonzero(ve.gate.weight) == 0  # gate = 2 sigmoid(0) = 1 at init
    assert ve.table.weight.std().item() == pytest.approx(lm.cfg.init_std, rel=0.1)
    off = build_model(_cfg({"value_embeddings": False}))
    assert not any("value_embed" in k for k in off.state_dict())


def _reference_layer(layer, x, tokens, cos, sin):
    """One pre-norm layer (ReLU^2 MLP, no QK-norm) with the value embedding, from the formulas."""
    att, ve = layer.mixer, layer.mixer.value_embed
    B, T_, d = x.shape
    hd = att.head_dim
    h = rms_norm(x, layer.attn_norm.eps) * layer.attn_norm.weight
    q = (h @ att.wq.weight.T).view(B, T_, -1, hd)
    k = (h @ att.wk.weight.T).view(B, T_, -1, hd)
    v = (h @ att.wv.weight.T).view(B, T_, -1, hd)
    Hkv = k.shape[2]
    gate = 2 * torch.sigmoid(h[..., :32] @ ve.gate.weight.T)  # (B, T, Hkv)
    v = v + gate[..., None] * ve.table.weight[tokens].view(B, T_, Hkv, hd)

    def rot(t):
        a, b = t[..., :hd // 2], t[..., hd // 2:]
        c, s = cos[None, :, None, :], sin[None, :, None, :]
        return torch.cat([a * c - b * s, a * s + b * c], dim=-1)
    q, k = rot(q), rot(k)
    rep = q.shape[2] // Hkv
    k, v = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)
    scores = torch.einsum("bthd,bshd->bhts", q, k) / math.sqrt(hd)
    scores = scores.masked_fill(torch.ones(T_, T_, dtype=torch.bool).triu(1), float("-inf"))
    y = torch.einsum("bhts,bshd->bthd", scores.softmax(-1), v).reshape(B, T_, -1)
    x = x + y @ att.wo.weight.T
    m = rms_norm(x, layer.mlp_norm.eps) * layer.mlp_norm.weight
    return x + F.relu(m @ layer.mlp.w1.weight.T).square() @ layer.mlp.w2.weight.T


def test_layer_matches_the_formulas():
    torch.manual_seed(0)
    lm = build_model(_cfg())
    _randomise(lm)
    layer = lm.coda[1]
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, T, 48, generator=g)
    tokens = torch.randint(0, V, (2, T), generator=g)
    cos, sin = lm.rope(T, "cpu")
    got = layer(x, (cos, sin), tokens=tokens)
    ref = _reference_layer(layer, x, tokens, cos, sin)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
    layer.mixer.value_embed.table.weight.data.zero_()  # and the value embedding is really part of it
    assert (layer(x, (cos, sin), tokens=tokens) - got).abs().max() > 1e-2 * ref.abs().max()
    with pytest.raises(ValueError, match="token ids"):
        layer(x, (cos, sin))


def test_zero_tables_give_the_model_without_value_embeddings():
    """VE(tokens) = 0 adds nothing, whatever the gate: the rest of the model is untouched."""
    cfg = _cfg({"state_init": "noise"})
    torch.manual_seed(0)
    lm = build_model(cfg)
    _randomise(lm)
    off = build_model(_cfg({"state_init": "noise", "value_embeddings": False}))
    missing, unexpected = off.load_state_dict(lm.state_dict(), strict=False)
    assert not missing and all("value_embed" in k for k in unexpected)
    tokens = torch.randint(0, V, (2, T))
    with torch.no_grad():
        for m in lm.modules():
            if hasattr(m, "table"):
                m.table.weight.zero_()
        a = lm(tokens, loops=3, noise_generator=torch.Generator().manual_seed(1)).logits
        b = off(tokens, loops=3, noise_generator=torch.Generator().manual_seed(1)).logits
    torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("ckpt", ["loop", "layer"])
def test_activation_checkpointing_and_per_sequence_loops_keep_the_token_ids(ckpt):
    torch.manual_seed(0)
    lm = build_model(_cfg())
    _randomise(lm)
    tokens, labels = torch.randint(0, V, (3, T)), torch.randint(0, V, (3, T))
    R = torch.tensor([1, 3, 2])

    def run():
        lm.zero_grad()
        out = lm(tokens, labels=labels, loops=R, grad_loops=R.clamp(max=2))
        out.loss.backward()
        return out.loss.detach(), {n: p.grad.clone() for n, p in lm.named_parameters() if p.grad is not None}
    loss0, g0 = run()
    lm.block.activation_checkpointing = ckpt
    loss1, g1 = run()
    torch.testing.assert_close(loss1, loss0)
    assert any("block.layers.1.mixer.value_embed" in n for n in g0)
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-5, atol=1e-7, msg=n)


@pytest.mark.parametrize("model, parallel, words", [
    ({}, {"tensor_parallel": 2}, "parallel.tensor_parallel=2"),
    ({}, {"pipeline_parallel": 2}, "parallel.pipeline_parallel=2"),
    ({"mixer": "gdn"}, {}, "['gdn']"),
])
def test_unsupported_layouts_are_refused(model, parallel, words):
    with pytest.raises(ConfigError, match="model.value_embeddings") as e:
        _cfg(model, parallel)
    assert words in str(e.value)
    _cfg({**model, "value_embeddings": False}, parallel)  # fine without them


def test_hf_export_matches_megaloop_with_and_without_cache(tmp_path):
    """The exported model computes megaloop's logits (value embeddings on three layers, one of them looped),
    at several loop counts, and the same step by step through its cache (the cached values include the
    value embedding of their own token)."""
    from megaloop.export import export_hf, load_exported
    cfg = _cfg({"state_init": "zeros", "vocab_size": 258})
    torch.manual_seed(0)
    lm = build_model(cfg)
    _randomise(lm)
    out = export_hf(lm.state_dict(), cfg.model, None, tmp_path / "out", verify=True)
    hf = load_exported(out)
    assert hf.config.value_embeddings
    x = torch.randint(0, 258, (2, T), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        for R in (1, 3):
            ref = lm(x, loops=R).logits
            full = hf(x, num_loops=R, use_cache=False).logits
            torch.testing.assert_close(full, ref, rtol=0, atol=1e-5)
            step = hf(x[:, :3], num_loops=R, use_cache=True)
            cache, pieces = step.cache, [step.logits]
            for t in range(3, T):
                step = hf(x[:, t:t + 1], cache=cache, num_loops=R)
                pieces.append(step.logits)
            torch.testing.assert_close(torch.cat(pieces, dim=1), ref, rtol=1e-5, atol=1e-4)
        # the tables matter: zeroing them changes the exported model's output
        for m in hf.modules():
            if hasattr(m, "table"):
                m.table.weight.zero_()
        assert (hf(x, num_loops=3, use_cache=False).logits - ref).abs().max() > 1e-3


def test_llama_export_refuses_value_embeddings():
    from megaloop.export.llama_export import llama_unrepresentable
    assert any("value_embeddings" in w for w in llama_unrepresentable(_cfg().model, 1))


def test_exit_gate_stage_runs_with_value_embeddings():
    """train.stage=exit_gate (megaloop/model/stage_losses.py) passes the token ids on: the stage's per-loop
    logits equal the model's own."""
    torch.manual_seed(0)
    lm = build_model(_cfg({"exit_gate": True}))
    _randomise(lm)
    tokens, labels = torch.randint(0, V, (2, T)), torch.randint(0, V, (2, T))
    with torch.no_grad():
        ref = lm(tokens, loops=3).logits
    lm.train_stage, lm.stage_params = "exit_gate", {"exit_gate_slope": 10.0, "exit_gate_margin": 0.0}
    out = lm(tokens, labels=labels, loops=3)
    assert torch.isfinite(out.loss)
    torch.testing.assert_close(out.logits, ref)
