"""The linear-time token mixers in the HF export (issue 7): Gated DeltaNet ("gdn"), sliding-window
attention ("swa") and DeepSeek sparse attention ("dsa"), alone, mixed ("4:1", "gdn,dsa") and with FLT's
attention injection. Exported logits == megaloop's; cached decoding (per-(loop, layer) recurrent/conv
states, windowed KV, KV + indexer keys) == the full forward; greedy generation with cache == without.

Sequences are longer than the window (16), the DSA top-k (16) and, in one variant, the GDN chunk (16),
so that each mechanism is actually exercised by the comparison."""
import pytest
import torch

from megaloop.export import export_hf, load_exported
from export_support import perturbed_model, tiny_config

VARIANTS = {
    "lt2_gdn": ("lt2_gdn", None),
    "lt2_hybrid": ("lt2_hybrid", None),
    "lt2_gdn_dsa": ("lt2_gdn_dsa", None),
    "swa": ("swa", None),
    # FLT: queries (GDN: the q conv stream, DSA: indexer queries too) from the previous loop's h
    "flt_gdn_dsa": ("lt2_gdn_dsa", ["model.arch=flt", "model.normalization=outer"]),
    # GDN prefill over several chunks; lt_ia: injected queries at layer 0 only; swa beside gdn
    "lt_ia_gdn_swa_chunked": ("lt2_gdn", ["model.arch=lt_ia", "model.normalization=outer", "model.mixer=gdn,swa",
                                          "model.gdn_chunk_size=16"]),
    # input injection and a norm between loops (how lt2_gdn_dsa.yaml shipped until LT2's own loop)
    "gdn_dsa_inject_outer": ("lt2_gdn_dsa", ["model.injection=add", "model.normalization=outer"]),
}
NAMES = list(VARIANTS)
T_FULL, T_PREFILL = 40, 30


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_mixers")
    cache = {}

    def get(name):
        if name not in cache:
            base, overrides = VARIANTS[name]
            cfg = tiny_config(base, overrides)
            model = perturbed_model(cfg)
            out = export_hf(model.state_dict(), cfg, cfg.data, root / name)  # verify=True: checked at export
            cache[name] = (model, load_exported(out), out)
        return cache[name]
    return get


def _ids(B=2, T=T_FULL, seed=3):
    return torch.randint(0, 256, (B, T), generator=torch.Generator().manual_seed(seed))


def _cached_pieces(hf, x, R, prefill=T_PREFILL, steps=7, **kw):
    """Prefill, then single-token steps, then the rest as one chunk on top of the cache."""
    out = hf(x[:, :prefill], num_loops=R, use_cache=True, **kw)
    cache, pieces = out.cache, [out.logits]
    for t in range(prefill, prefill + steps):
        pieces.append(hf(x[:, t:t + 1], cache=cache, num_loops=R, **kw).logits)
    pieces.append(hf(x[:, prefill + steps:], cache=cache, num_loops=R, **kw).logits)
    assert cache.get_seq_length() == x.shape[1]
    return torch.cat(pieces, dim=1), cache


@pytest.mark.parametrize("name", NAMES)
def test_logits_and_cached_decoding_match_megaloop(exported, name):
    model, hf, _ = exported(name)
    x = _ids()
    with torch.no_grad():
        for R in (1, 3, 4):
            ref = model(x, loops=R).logits
            full = hf(x, num_loops=R, use_cache=False).logits
            torch.testing.assert_close(full, ref, rtol=0, atol=1e-5, msg=f"{name}: full forward, {R} loops")
            stepped, cache = _cached_pieces(hf, x, R)
            torch.testing.assert_close(stepped, full, rtol=0, atol=1e-5, msg=f"{name}: cached decoding, {R} loops")
            assert {k for k in cache.slots if k[0] == "loop"} == {("loop", t, i) for t in range(R)
                                                                 for i in range(len(hf.block.layers))}


@pytest.mark.parametrize("name", NAMES)
def test_greedy_generate_with_cache_equals_without(exported, name):
    _, hf, _ = exported(name)
    x = _ids(2, 12, seed=7)
    with torch.no_grad():
        a = hf.generate(x, max_new_tokens=14, do_sample=False, use_cache=True, num_loops=3, pad_token_id=257)
        b = hf.generate(x, max_new_tokens=14, do_sample=False, use_cache=False, num_loops=3, pad_token_id=257)
    assert a.shape == (2, 26) and torch.equal(a, b)


def test_cache_slots_hold_the_mixer_states(exported):
    _, hf, _ = exported("lt_ia_gdn_swa_chunked")  # layer 0 gdn, layer 1 swa (window 16)
    cfg = hf.config
    with torch.no_grad():
        out = hf(_ids(2, 25), num_loops=2, use_cache=True)
    H, dk, C, W = cfg.n_heads, cfg.head_dim, cfg.n_heads * cfg.head_dim, cfg.conv_size
    for t in range(2):
        gdn, swa = out.cache.slots[("loop", t, 0)], out.cache.slots[("loop", t, 1)]
        assert set(gdn) == {"state", "conv_q", "conv_k", "conv_v"}
        assert gdn["state"].shape == (2, H, dk, dk) and gdn["conv_q"].shape == (2, C, W - 1)
        assert swa["k"].shape[2] == cfg.window - 1  # trimmed to the window
    # lt_ia restarts every loop from e: layer 0's keys/values (hence its state) are the same in both loops,
    # but from loop 1 on its queries come from h(0), and the query stream's conv state says so
    s0, s1 = out.cache.slots[("loop", 0, 0)], out.cache.slots[("loop", 1, 0)]
    torch.testing.assert_close(s0["state"], s1["state"], rtol=0, atol=0)
    assert not torch.allclose(s0["conv_q"], s1["conv_q"])
    _, hf, _ = exported("lt2_gdn")  # recurrent: each loop scans its own stream from zero
    with torch.no_grad():
        out = hf(_ids(2, 25), num_loops=2, use_cache=True)
    assert not torch.allclose(out.cache.slots[("loop", 0, 0)]["state"], out.cache.slots[("loop", 1, 0)]["state"])
    _, hf, _ = exported("lt2_gdn_dsa")
    with torch.no_grad():
        out = hf(_ids(2, 25), num_loops=2, use_cache=True)
    dsa = out.cache.slots[("loop", 1, 1)]
    assert set(dsa) == {"k", "v", "ki"} and dsa["ki"].shape == (2, 25, hf.config.dsa_index_dim)


def test_dsa_ties_are_broken_towards_earlier_keys(exported):
    """A zero indexer head weight makes every score 0.0: all keys tie. The selection is then the
    earliest top-k keys, whatever the row length, so cached decoding still equals the full forward."""
    model, hf, _ = exported("lt2_gdn_dsa")
    x = _ids(1, 30, seed=9)
    with torch.no_grad():
        saved = hf.block.layers[1].mixer.w_index.weight.clone(), model.block.layers[1].mixer.w_index.weight.clone()
        try:
            hf.block.layers[1].mixer.w_index.weight.zero_()
            model.block.layers[1].mixer.w_index.weight.zero_()
            full = hf(x, num_loops=2, use_cache=False).logits
            stepped, _ = _cached_pieces(hf, x, 2, prefill=10, steps=12)
            torch.testing.assert_close(stepped, full, rtol=0, atol=1e-5)
            torch.testing.assert_close(full, model(x, loops=2).logits, rtol=0, atol=1e-5)
        finally:
            hf.block.layers[1].mixer.w_index.weight.copy_(saved[0])
            model.block.layers[1].mixer.w_index.weight.copy_(saved[1])


@pytest.mark.parametrize("name", ["flt_gdn_dsa", "swa", "lt_ia_gdn_swa_chunked"])
def test_left_padding_matches_unpadded_rows(exported, name):
    _, hf, _ = exported(name)
    long, short = _ids(1, 24, seed=1), _ids(1, 19, seed=2)
    batch = torch.cat([long, torch.cat([torch.full((1, 5), 257), short], 1)], 0)
    mask = torch.ones_like(batch)
    mask[1, :5] = 0
    with torch.no_grad():
        out = hf(batch, attention_mask=mask, num_loops=3, use_cache=False).logits
        torch.testing.assert_close(out[0], hf(long, num_loops=3, use_cache=False).logits[0], rtol=0, atol=1e-5)
        torch.testing.assert_close(out[1, 5:], hf(short, num_loops=3, use_cache=False).logits[0], rtol=0, atol=1e-5)
        gen = hf.generate(batch, attention_mask=mask, max_new_tokens=6, do_sample=False, num_loops=3,
                          pad_token_id=257)
        solo = hf.generate(short, max_new_tokens=6, do_sample=False, num_loops=3, pad_token_id=257)
    assert torch.equal(gen[1, 5:], solo[0])


def test_exits_with_the_new_mixers(exported):
    _, hf, _ = exported("flt_gdn_dsa")
    x = _ids(1, 24)
    kw = dict(num_loops=5, exit_strategy="kl", exit_threshold=1e-2)
    with torch.no_grad():
        full = hf(x, use_cache=False, exit_kv="compute", **kw)
        stepped, _ = _cached_pieces(hf, x, 5, prefill=16, steps=4, exit_kv="compute",
                                    exit_strategy="kl", exit_threshold=1e-2)
        torch.testing.assert_close(stepped, full.logits, rtol=0, atol=1e-5)
        # 'copy': every token exits at loop 2, loops 3..5 are skipped and their slots take loop 2's state
        out = hf(x, use_cache=True, num_loops=5, exit_strategy="kl", exit_threshold=1e9)
        assert out.loops_computed == 2
        gdn_src, gdn_dst = out.cache.slots[("loop", 1, 0)], out.cache.slots[("loop", 4, 0)]
        assert torch.equal(gdn_src["state"], gdn_dst["state"]) and torch.equal(gdn_src["conv_k"], gdn_dst["conv_k"])
        assert out.cache.slots[("loop", 4, 1)]["ki"].shape[1] == 24
        step = hf(x[:, :1], cache=out.cache, num_loops=5, exit_strategy="kl", exit_threshold=1e9)
        assert step.loops_computed == 2 and out.cache.slots[("loop", 4, 1)]["k"].shape[2] == 25
        gen = hf.generate(x, max_new_tokens=5, do_sample=False, pad_token_id=257, **kw)
        assert gen.shape == (1, 29)


def test_bfloat16_export_verifies_and_decodes(tmp_path):
    cfg = tiny_config("lt2_gdn_dsa", ["model.arch=flt", "model.normalization=outer"])
    model = perturbed_model(cfg)
    out = export_hf(model.state_dict(), cfg, cfg.data, tmp_path / "bf16", dtype="bfloat16")  # verify=True
    hf = load_exported(out).to(torch.bfloat16)
    x = _ids(2, 20)
    with torch.no_grad():
        gen = hf.generate(x, max_new_tokens=6, do_sample=False, num_loops=3, pad_token_id=257)
        out = hf(gen, num_loops=3, use_cache=True)
    assert gen.shape == (2, 26) and out.logits.dtype == torch.bfloat16
    assert out.cache.slots[("loop", 2, 0)]["state"].dtype == torch.float32  # the GDN state stays float32
    torch.testing.assert_close(out.logits.float(), model(gen, loops=3).logits, rtol=0, atol=0.15)
