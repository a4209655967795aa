"""The linear-time mixers as parts of the looped model (kernels are tested in tests/test_ops_*)."""
import pytest
import torch

from megaloop.config import MIXER_NAMES, ConfigError, load_config, mixer_pattern
from megaloop.model import build_model
from megaloop.model.mixers import MIXERS


def _cfg(overrides):
    base = ["model.d_model=32", "model.n_heads=4", "model.n_kv_heads=2", "model.max_seq_len=64",
            "data.seq_len=64"]
    return load_config(None, base + overrides)


def test_ratio_and_list_patterns_spread_along_depth():
    assert mixer_pattern("4:1", 10) == ["gdn"] * 4 + ["attn"] + ["gdn"] * 4 + ["attn"]
    assert mixer_pattern("2:1", 3, linear_mixer="swa") == ["swa", "swa", "attn"]
    assert mixer_pattern("gdn,attn", 4) == ["gdn", "attn", "gdn", "attn"]
    with pytest.raises(ConfigError, match="tile"):
        mixer_pattern("4:1", 4)
    with pytest.raises(ConfigError, match="unknown mixer 'gnd'"):
        _cfg(["model.mixer=gnd"])


def test_every_mixer_class_has_a_name_configs_may_use():
    # config.py validates model.mixer without importing the model: its names must cover the registry.
    assert set(MIXERS) <= MIXER_NAMES and {"attn", "gdn", "swa", "dsa"} <= set(MIXERS)


def test_dsa_with_full_topk_equals_dense_attention_model():
    torch.manual_seed(0)
    dense = build_model(_cfg(["model.mixer=attn"])).eval()
    sparse = build_model(_cfg(["model.mixer=dsa", "model.dsa_topk=64"])).eval()
    missing, unexpected = sparse.load_state_dict(dense.state_dict(), strict=False)
    assert not unexpected and all("index" in k for k in missing)
    x = torch.randint(0, 258, (2, 40))
    torch.testing.assert_close(sparse(x, loops=3).logits, dense(x, loops=3).logits, rtol=1e-5, atol=1e-5)
    # With a small top-k it is genuinely sparse: outputs differ from dense.
    small = build_model(_cfg(["model.mixer=dsa", "model.dsa_topk=4"])).eval()
    small.load_state_dict(sparse.state_dict())
    assert not torch.allclose(small(x, loops=3).logits, dense(x, loops=3).logits, atol=1e-4)


def test_swa_with_window_covering_the_sequence_equals_dense_attention_model():
    torch.manual_seed(0)
    dense = build_model(_cfg(["model.mixer=attn"])).eval()
    swa = build_model(_cfg(["model.mixer=swa", "model.window=64"])).eval()
    swa.load_state_dict(dense.state_dict())
    x = torch.randint(0, 258, (2, 40))
    torch.testing.assert_close(swa(x, loops=2).logits, dense(x, loops=2).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("loops", [1, 2, 3])
def test_looped_window_layer_receptive_field_is_loops_times_window_minus_one(loops):
    """One window-w layer looped T times sees exactly T*(w-1) tokens back (checked with autograd)."""
    w, t, T = 4, 30, 32
    torch.manual_seed(0)
    model = build_model(_cfg(["model.mixer=swa", f"model.window={w}", "model.n_loop=1",
                              "model.injection=none", "model.embed_norm=false"]))
    e = model.embedding(torch.randint(0, 258, (1, T))).detach().requires_grad_(True)
    rope = model.rope(T, e.device)
    out = model.block(e, rope, loops)
    out.out[0, t].sum().backward()
    reach = (e.grad[0].abs().sum(-1) > 0).nonzero().flatten()
    assert reach.min().item() == t - loops * (w - 1) and reach.max().item() == t


def test_dsa_indexer_learns_from_its_auxiliary_loss_without_changing_the_forward():
    torch.manual_seed(0)
    model = build_model(_cfg(["model.mixer=dsa", "model.dsa_topk=8", "model.dsa_indexer_loss_coef=0.5"]))
    x = torch.randint(0, 258, (2, 32))
    model.train()
    out_train = model(x[:, :-1], labels=x[:, 1:], loops=2)
    out_train.loss.backward()
    mixer = model.block.layers[0].mixer
    assert mixer.wq_index.weight.grad is not None and mixer.wq_index.weight.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        out_eval = model(x[:, :-1], labels=x[:, 1:], loops=2)
    torch.testing.assert_close(out_train.logits.detach(), out_eval.logits)


def test_gdn_mixer_matches_the_recurrent_reference_inside_the_model(monkeypatch):
    """Swapping the chunked kernel for the naive recurrence changes nothing (forward and grads)."""
    import megaloop.model.gated_deltanet as gdn_mod
    from megaloop.ops import gated_delta_rule_recurrent

    torch.manual_seed(0)
    model = build_model(_cfg(["model.mixer=gdn", "model.gdn_chunk_size=8"])).double()
    x = torch.randint(0, 258, (2, 21))
    out = model(x[:, :-1], labels=x[:, 1:], loops=3)
    out.loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    monkeypatch.setattr(gdn_mod, "gated_delta_rule",
                        lambda q, k, v, g, beta, scale=None, chunk_size=None: gated_delta_rule_recurrent(q, k, v, g, beta, scale=scale))
    ref = model(x[:, :-1], labels=x[:, 1:], loops=3)
    ref.loss.backward()
    torch.testing.assert_close(out.logits, ref.logits)
    for g, p in zip(grads, model.parameters()):
        torch.testing.assert_close(g, p.grad)
