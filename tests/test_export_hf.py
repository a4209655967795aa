"""Exported Hugging Face model == megaloop model, for every tiny architecture and several loop counts."""
from pathlib import Path

import pytest
import torch

from megaloop.export import export_hf, load_exported
from export_support import EXPORTABLE_CONFIGS, perturbed_model, tiny_config

IDS = [Path(p).stem for p in EXPORTABLE_CONFIGS]
LOOPS = (1, 3, 4, 7)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """name -> (megaloop model, exported HF model), each exported once."""
    root = tmp_path_factory.mktemp("hf")
    cache = {}

    def get(name):
        if name not in cache:
            cfg = tiny_config(name)
            model = perturbed_model(cfg)
            out = export_hf(model.state_dict(), cfg, cfg.data, root / name, verify=False)
            cache[name] = (model, load_exported(out, noise_init="global_rng"), out)
        return cache[name]
    return get


def _ids(B=2, T=20, seed=3):
    return torch.randint(0, 258, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", IDS)
def test_logits_match_megaloop_at_several_loop_counts(exported, name):
    model, hf, _ = exported(name)
    x = _ids()
    with torch.no_grad():
        for R in LOOPS:
            torch.manual_seed(11)  # the same draw for a noise initial state
            ref = model(x, loops=R).logits
            torch.manual_seed(11)
            got = hf(x, num_loops=R, use_cache=False).logits
            torch.testing.assert_close(got, ref, rtol=0, atol=1e-5, msg=f"{name} at {R} loops")


@pytest.mark.parametrize("name", ["huginn", "parcae"])
def test_seeded_noise_is_deterministic_and_matches_megaloop_given_the_same_noise(exported, name, monkeypatch):
    model, _, out = exported(name)
    hf = load_exported(out)  # default noise_init="seeded"
    assert hf.config.noise_init == "seeded"
    x = _ids()
    with torch.no_grad():
        torch.manual_seed(0)
        a = hf(x, num_loops=4, use_cache=False).logits
        torch.manual_seed(1)
        b = hf(x, num_loops=4, use_cache=False).logits
        torch.testing.assert_close(a, b, rtol=0, atol=0)  # independent of the global RNG
        positions = torch.arange(x.shape[1])[None].expand_as(x)
        monkeypatch.setattr(model.block, "initial_state", lambda e, generator=None: hf.noise_for_positions(positions, e))
        torch.testing.assert_close(a, model(x, loops=4).logits, rtol=0, atol=1e-5)
        # row-independent: a row's logits do not depend on the rest of the batch
        torch.testing.assert_close(hf(x[1:], num_loops=4, use_cache=False).logits, a[1:], rtol=0, atol=1e-5)


@pytest.mark.parametrize("name,strategy,threshold", [("ouro", "q_exit", 0.5), ("ouro", "kl", 5e-3),
                                                     ("lt", "kl", 5e-3), ("flt", "kl", 2e-2)])
def test_exits_match_megaloop(exported, name, strategy, threshold):
    model, hf, _ = exported(name)
    x = _ids()
    with torch.no_grad():
        for R in (1, 4, 7):
            ref = model(x, loops=R, exit=strategy, exit_threshold=threshold)
            for kv in ("copy", "compute"):
                got = hf(x, num_loops=R, exit_strategy=strategy, exit_threshold=threshold, exit_kv=kv,
                         use_cache=False)
                torch.testing.assert_close(got.logits, ref.logits, rtol=0, atol=1e-5)
                assert torch.equal(got.exit_loops, ref.exit_loops), (name, strategy, R, kv)


def test_exit_thresholds_reach_both_ends(exported):
    _, hf, _ = exported("ouro")
    x = _ids()
    with torch.no_grad():
        early = hf(x, num_loops=6, exit_strategy="kl", exit_threshold=1e9, use_cache=False)
        assert (early.exit_loops == 2).all() and early.loops_computed == 2
        late = hf(x, num_loops=6, exit_strategy="q_exit", exit_threshold=1.0 + 1e-6, use_cache=False)
        assert (late.exit_loops == 6).all() and late.loops_computed == 6
        torch.testing.assert_close(late.logits, hf(x, num_loops=6, use_cache=False).logits)


def test_hf_labels_give_the_shifted_loss(exported):
    model, hf, _ = exported("lt")
    x = _ids(2, 16)
    with torch.no_grad():
        ref = model(x[:, :-1], labels=x[:, 1:], loops=3).loss
        got = hf(x, labels=x, num_loops=3, use_cache=False).loss
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)


def test_unknown_mixer_is_refused_clearly():
    from megaloop.export.hf_template.configuration_megaloop import MegaloopConfig
    from megaloop.export.hf_template.modeling_megaloop import MegaloopForCausalLM

    with pytest.raises(ValueError, match="token mixer 'mamba'.*does not implement"):
        MegaloopForCausalLM(MegaloopConfig(mixer="mamba,attn"))
