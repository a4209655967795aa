"""init.convert_mixers (issue 15 item 2): a source's softmax-attention looped layers become gdn / swa / dsa,
q/k/v/o from the attention by the rule of megaloop/checkpoint/convert_mixers.py, new parts at their own init,
everything else copied. References: the source tensors themselves (rule written out here per head), and the
source model's logits (swa / dsa that see every key compute the source's function exactly)."""
import math

import pytest
import torch

from megaloop.checkpoint import CheckpointError, save_plain_checkpoint
from megaloop.checkpoint.convert_mixers import convert_state_dict, converted_init
from megaloop.config import ConfigError, config_from_dict
from megaloop.model import build_model

T = 16
BASE = {"vocab_size": 258, "d_model": 32, "n_heads": 4, "n_kv_heads": 2, "max_seq_len": T, "n_prelude": 1,
        "n_loop": 4, "n_coda": 1, "loops": 3, "arch": "recurrent", "injection": "add", "qk_norm": True,
        "attn_output_gate": True, "conv_size": 4, "gdn_chunk_size": 8}


def _cfg(**model):
    return config_from_dict({"model": {**BASE, **model}, "data": {"seq_len": T}})


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A softmax-attention looped model with non-trivial weights, saved as a plain checkpoint."""
    cfg = _cfg()
    torch.manual_seed(0)
    model = build_model(cfg)
    with torch.no_grad():  # break init symmetries (norm scales at 1, zero-init gates)
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    path = save_plain_checkpoint(model, cfg, tmp_path_factory.mktemp("conv") / "src.pt")
    return model.eval(), cfg, path


def _converted(source, spec, **model):
    src_model, _, path = source
    cfg = _cfg(mixer=spec, **model)
    fill, note = converted_init(path, cfg.model, spec)
    torch.manual_seed(1)
    fresh_model = build_model(cfg)
    fresh = {k: v.clone() for k, v in fresh_model.state_dict().items()}
    sd = fill(fresh_model.state_dict())
    model = build_model(cfg)
    model.load_state_dict(sd, strict=True)
    return model.eval(), sd, fresh, note


def _logits(model, tokens, loops=3):
    with torch.no_grad():
        return model(tokens, loops=loops).logits


def test_copied_parameters_equal_and_new_ones_keep_their_own_init(source):
    src_model, _, _ = source
    model, sd, fresh, note = _converted(source, "gdn,dsa,swa,attn", window=T, dsa_topk=T)
    assert "0:attn->gdn" in note and "1:attn->dsa" in note and "2:attn->swa" in note and "3:" not in note
    src = src_model.state_dict()
    for k, v in sd.items():
        if k.startswith(("block.layers.0.mixer.", "block.layers.1.mixer.", "block.layers.2.mixer.")):
            continue
        assert torch.equal(v, src[k]), k  # prelude, coda, MLPs, norms, layer 3's attention, embedding
    for name in ("q_conv", "k_conv", "v_conv", "A_log", "dt_bias", "out_norm_weight", "w_a.weight", "w_b.weight",
                 "w_gate.weight"):
        assert torch.equal(sd[f"block.layers.0.mixer.{name}"], fresh[f"block.layers.0.mixer.{name}"]), name
    for name in ("wq_index.weight", "wk_index.weight", "w_index.weight"):
        assert torch.equal(sd[f"block.layers.1.mixer.{name}"], fresh[f"block.layers.1.mixer.{name}"]), name
    for i in (1, 2):
        for name in ("wq", "wk", "wv", "wo", "q_norm", "k_norm", "gate"):
            assert torch.equal(sd[f"block.layers.{i}.mixer.{name}.weight"], src[f"block.layers.{i}.mixer.{name}.weight"])


def test_the_trainers_per_tensor_conversion_equals_the_whole_one(source):
    # The trainer converts per tensor over initial values drawn per tensor (no rank holds the whole model).
    from megaloop.checkpoint.lazy_state_dict import LazyStateDict
    from megaloop.parallel.materialize import InitialStateDict, meta_reference
    _, _, path = source
    spec = "gdn,dsa,swa,attn"
    cfg = _cfg(mixer=spec, window=T, dsa_topk=T)
    fill, _ = converted_init(path, cfg.model, spec)
    torch.manual_seed(1)
    whole = dict(fill(build_model(cfg).state_dict()))
    torch.manual_seed(1)
    with torch.device("meta"):
        lm = build_model(cfg)
    lazy = fill(InitialStateDict(meta_reference(lm)))
    assert isinstance(lazy, LazyStateDict) and set(lazy) == set(whole)
    for k in whole:
        assert torch.equal(lazy[k], whole[k]), k


@pytest.mark.parametrize("expand_v", [1.0, 2.0, 0.5])
def test_gdn_projections_follow_the_rule(source, expand_v):
    src_model, _, _ = source
    _, sd, fresh, _ = _converted(source, "gdn,attn,gdn,attn", gdn_expand_v=expand_v)
    src = src_model.state_dict()
    H, Hkv, hd, d = 4, 2, 8, 32
    dv = int(hd * expand_v)
    for i in (0, 2):
        p = f"block.layers.{i}.mixer."
        assert torch.equal(sd[p + "wq.weight"], src[p + "wq.weight"])
        wk, wv, wo = sd[p + "wk.weight"], sd[p + "wv.weight"], sd[p + "wo.weight"]
        assert wk.shape == (H * hd, d) and wv.shape == (H * dv, d) and wo.shape == (d, H * dv)
        for h in range(H):
            j = h // (H // Hkv)  # the kv head query head h shares in the source (GQA)
            assert torch.equal(wk[h * hd:(h + 1) * hd], src[p + "wk.weight"][j * hd:(j + 1) * hd])
            n = min(hd, dv)
            assert torch.equal(wv[h * dv:h * dv + n], src[p + "wv.weight"][j * hd:j * hd + n])
            assert torch.equal(wo[:, h * dv:h * dv + n], src[p + "wo.weight"][:, h * hd:h * hd + n])
            if dv > hd:  # extra value rows: GDN's own init; their output columns: zero
                assert torch.equal(wv[h * dv + hd:(h + 1) * dv], fresh[p + "wv.weight"][h * dv + hd:(h + 1) * dv])
                assert not wo[:, h * dv + hd:(h + 1) * dv].any()


@pytest.mark.parametrize("spec,extra", [("swa", {"window": T}), ("dsa", {"dsa_topk": T}),
                                        ("swa,dsa,swa,attn", {"window": 64, "dsa_topk": 100})])
def test_sparse_attention_seeing_every_key_computes_the_source_function(source, spec, extra):
    src_model, _, _ = source
    model, _, _, _ = _converted(source, spec, **extra)
    tokens = torch.randint(0, 258, (2, T), generator=torch.Generator().manual_seed(3))
    for loops in (1, 3):
        ref, got = _logits(src_model, tokens, loops), _logits(model, tokens, loops)
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    # ... and a window shorter than the sequence does change it (the check above is not vacuous)
    narrow, _, _, _ = _converted(source, "swa", window=4)
    assert (_logits(narrow, tokens) - _logits(src_model, tokens)).abs().max() > 1e-3


def test_gdn_hybrid_runs_with_a_finite_loss(source):
    model, _, _, _ = _converted(source, "3:1")
    tokens = torch.randint(0, 258, (2, T), generator=torch.Generator().manual_seed(4))
    out = model.train()(tokens, labels=tokens, loops=3)
    assert math.isfinite(out.loss.item())
    out.loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)


def test_bad_specs_are_refused(source, tmp_path):
    _, _, path = source
    with pytest.raises(ConfigError, match="does not tile"):
        _cfg(mixer="gdn,gdn,attn").model  # (model.mixer itself)
    with pytest.raises(ConfigError, match="init.convert_mixers='gdn,gdn,attn'.*does not tile"):
        converted_init(path, _cfg(mixer="gdn").model, "gdn,gdn,attn")
    with pytest.raises(ConfigError, match="model.mixer='attn' gives attn,attn,attn,attn"):
        config_from_dict({"model": BASE, "data": {"seq_len": T}, "init": {"from": str(path), "convert_mixers": "gdn"}})
    with pytest.raises(ConfigError, match="needs init.from"):
        config_from_dict({"model": {**BASE, "mixer": "gdn"}, "data": {"seq_len": T}, "init": {"convert_mixers": "gdn"}})
    # A GDN hybrid as the source: its GDN layer is not attention, so it cannot become swa.
    hybrid = _cfg(mixer="gdn,attn,attn,attn")
    torch.manual_seed(0)
    hpath = save_plain_checkpoint(build_model(hybrid), hybrid, tmp_path / "hybrid.pt")
    with pytest.raises(ConfigError, match="looped layer 0 is 'gdn' in the source"):
        converted_init(hpath, _cfg(mixer="swa,attn,attn,attn").model, "swa,attn,attn,attn")
    # ... while keeping it and converting another layer is fine
    fill, _ = converted_init(hpath, _cfg(mixer="gdn,gdn,attn,attn").model, "gdn,gdn,attn,attn")
    with pytest.raises(CheckpointError, match="n_loop"):
        converted_init(path, _cfg(mixer="gdn", n_loop=2).model, "gdn")
    with pytest.raises(CheckpointError, match="d_model|shape"):
        converted_init(path, _cfg(mixer="gdn", d_model=64, n_heads=8).model, "gdn")


def test_trainer_starts_a_converted_run_from_the_converted_model(tmp_path):
    """Through the trainer (TP 2): a run converting a trained source into swa seeing every key starts from
    the source's loss on its first batch (the conversion landed in the sharded model)."""
    from test_init_from import _first_batch_loss
    from test_train_support import assert_ok, make_byte_dataset, run_ranks, tiny_config, train_rows, write_config
    from megaloop.checkpoint import load_model
    data = make_byte_dataset(str(tmp_path / "data"))
    src = str(tmp_path / "src")
    cfg = tiny_config(data, src, train={"steps": 3, "log_interval": 1}, model={"n_loop": 2})
    assert_ok(run_ranks(1, ["--config", write_config(str(tmp_path / "src.yaml"), cfg)], timeout=120))
    out = str(tmp_path / "conv")
    cfg = tiny_config(data, out, train={"steps": 1, "log_interval": 1}, parallel={"tensor_parallel": 2},
                      model={"n_loop": 2, "mixer": "swa,attn", "window": 32},
                      init={"from": src, "convert_mixers": "swa,attn"})
    results = run_ranks(2, ["--config", write_config(str(tmp_path / "conv.yaml"), cfg)], timeout=150)
    assert_ok(results)
    assert "converting looped layers 0:attn->swa" in results[0][1]
    got = train_rows(out)[1]["loss"]
    ref = _first_batch_loss(load_model(src)[0], cfg)
    assert math.isclose(got, ref, rel_tol=1e-5), (got, ref)
