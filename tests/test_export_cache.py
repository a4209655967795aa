"""The exported model's KV cache: cached step-by-step logits and generation equal the uncached ones."""
from pathlib import Path

import pytest
import torch

from megaloop.export import export_hf, load_exported
from export_support import EXPORTABLE_CONFIGS, perturbed_model, tiny_config

IDS = [Path(p).stem for p in EXPORTABLE_CONFIGS]


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("hfc")
    cache = {}

    def get(name):
        if name not in cache:
            cfg = tiny_config(name)
            out = export_hf(perturbed_model(cfg).state_dict(), cfg, cfg.data, root / name, verify=False)
            cache[name] = load_exported(out)  # noise_init="seeded": deterministic, cache-consistent
        return cache[name]
    return get


def _ids(B=2, T=12, seed=5):
    return torch.randint(0, 256, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", IDS)
def test_cached_logits_step_by_step_equal_the_full_forward(hf_models, name):
    hf = hf_models(name)
    x = _ids()
    with torch.no_grad():
        for R in (1, 3):
            full = hf(x, num_loops=R, use_cache=False).logits
            out = hf(x[:, :5], num_loops=R, use_cache=True)  # prefill
            cache, pieces = out.cache, [out.logits]
            for t in range(5, 8):  # one token at a time
                out = hf(x[:, t:t + 1], cache=cache, num_loops=R)
                pieces.append(out.logits)
            out = hf(x[:, 8:], cache=cache, num_loops=R)  # a multi-token chunk on top of a cache
            pieces.append(out.logits)
            assert cache.get_seq_length() == x.shape[1]
            # one slot per (loop, layer): prelude + R * looped + R-or-1 coda
            torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=0, atol=1e-5, msg=f"{name} R={R}")


@pytest.mark.parametrize("name", ["lt", "flt", "huginn", "ouro", "parcae", "lt2_gates"])
def test_greedy_generate_with_cache_equals_without(hf_models, name):
    hf = hf_models(name)
    x = _ids(2, 6)
    with torch.no_grad():
        a = hf.generate(x, max_new_tokens=8, do_sample=False, use_cache=True, num_loops=3, pad_token_id=257)
        b = hf.generate(x, max_new_tokens=8, do_sample=False, use_cache=False, num_loops=3, pad_token_id=257)
        assert a.shape == (2, 14)
        assert torch.equal(a, b)
        # and the loop count reaches forward(): another R gives another continuation in general
        c = hf.generate(x, max_new_tokens=8, do_sample=False, num_loops=1, pad_token_id=257)
        assert c.shape == (2, 14)


def test_one_cache_slot_per_loop_and_layer(hf_models):
    hf = hf_models("huginn")  # 1 prelude, 2 looped, 1 coda layer
    with torch.no_grad():
        out = hf(_ids(1, 4), num_loops=5, use_cache=True)
    keys = set(out.cache.slots)
    assert keys == ({("prelude", 0)} | {("loop", t, i) for t in range(5) for i in range(2)} | {("coda", 4, 0)})
    with pytest.raises(ValueError, match="num_loops=5"):
        hf(_ids(1, 1), cache=out.cache, num_loops=6)


def test_exit_with_cache(hf_models):
    hf = hf_models("ouro")
    x = _ids(1, 10)
    with torch.no_grad():
        for strategy, q in (("q_exit", 0.5), ("kl", 5e-3)):
            kw = dict(num_loops=6, exit_strategy=strategy, exit_threshold=q)
            full = hf(x, use_cache=False, exit_kv="compute", **kw)
            out = hf(x[:, :4], use_cache=True, exit_kv="compute", **kw)
            pieces = [out.logits]
            for t in range(4, 10):
                pieces.append(hf(x[:, t:t + 1], cache=out.cache, exit_kv="compute", **kw).logits)
            torch.testing.assert_close(torch.cat(pieces, 1), full.logits, rtol=0, atol=1e-5)
            # 'copy' stops computing early and still generates
            gen = hf.generate(x, max_new_tokens=6, do_sample=False, pad_token_id=257, **kw)
            assert gen.shape == (1, 16)
        # an exit that fires at loop 2 for every token: later loops are never computed but cache slots exist
        out = hf(x, use_cache=True, num_loops=6, exit_strategy="kl", exit_threshold=1e9)
        assert out.loops_computed == 2
        step = hf(x[:, :1], cache=out.cache, num_loops=6, exit_strategy="kl", exit_threshold=1e9)
        assert step.loops_computed == 2 and out.cache.slots[("loop", 5, 0)]["k"].shape[2] == 11


def test_left_padding_matches_unpadded_rows(hf_models):
    hf = hf_models("flt")
    long, short = _ids(1, 8, seed=1), _ids(1, 5, seed=2)
    pad = torch.full((1, 3), 257)
    batch = torch.cat([long, torch.cat([pad, short], 1)], 0)
    mask = torch.ones_like(batch)
    mask[1, :3] = 0
    with torch.no_grad():
        out = hf(batch, attention_mask=mask, num_loops=3, use_cache=False).logits
        torch.testing.assert_close(out[0], hf(long, num_loops=3, use_cache=False).logits[0], rtol=0, atol=1e-5)
        torch.testing.assert_close(out[1, 3:], hf(short, num_loops=3, use_cache=False).logits[0], rtol=0, atol=1e-5)
        gen = hf.generate(batch, attention_mask=mask, max_new_tokens=4, do_sample=False, num_loops=3,
                          pad_token_id=257)
        solo = hf.generate(short, max_new_tokens=4, do_sample=False, num_loops=3, pad_token_id=257)
        assert torch.equal(gen[1, 3:], solo[0])
