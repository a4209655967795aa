"""model.recipe presets (megaloop/config/recipes.py) and model.init_scheme: the preset builds the reference's
structure, explicit keys win, a saved run does not depend on the preset table, and training the baseline LT at
R > 1 (which collapses, docs/looped_models.md section 11) is warned about (issue 23)."""
import math

import pytest
import torch

from megaloop.config import ConfigError, load_config, save_config
from megaloop.config import recipes
from megaloop.model.layers import RMSNorm
from megaloop.model.looped_lm import LoopedLM

TINY = "yaml_configs/tiny/lt.yaml"


@pytest.fixture(scope="module")
def flt_model():
    cfg = load_config(TINY, ["model.recipe=flt_reference"])
    torch.manual_seed(0)
    return cfg, LoopedLM(cfg.model)


def test_flt_reference_builds_the_reference_structure(flt_model):
    cfg, model = flt_model
    m = cfg.model
    assert (m.mlp, m.norm_scale, m.qk_norm, m.logit_softcap, m.zero_init_out, m.tie_embeddings, m.init_scheme) == \
        ("relu2", False, True, 15.0, True, False, "nanochat")
    assert not any(isinstance(mod, RMSNorm) and any(True for _ in mod.parameters()) for mod in model.modules())
    layer = model.block.layers[0]
    assert layer.mixer.q_norm is not None and layer.mixer.k_norm is not None
    assert model.head.weight is not model.embedding.weight
    d = m.d_model
    assert model.embedding.weight.std().item() == pytest.approx(1.0, rel=0.05)
    assert model.head.weight.std().item() == pytest.approx(1e-3, rel=0.05)
    for lin in (layer.mixer.wq, layer.mixer.wk, layer.mixer.wv, layer.mlp.w1):  # uniform, std 1/sqrt(d)
        assert lin.weight.abs().max().item() <= math.sqrt(3 / d) + 1e-7
        assert lin.weight.std().item() == pytest.approx(d ** -0.5, rel=0.1)
    assert layer.mixer.wo.weight.abs().max() == 0 and layer.mlp.w2.weight.abs().max() == 0
    assert layer.mlp.w1.weight.shape[0] == 4 * d  # ReLU² of width 4d, no gate
    logits = model(torch.randint(0, 258, (2, 8))).logits
    assert logits.abs().max() <= 15.0


def test_explicit_keys_and_overrides_win_and_unknown_recipe_is_one_line(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("model:\n  recipe: flt_reference\n  mlp: swiglu\n")
    cfg = load_config(p, ["model.logit_softcap=30"])
    assert cfg.model.mlp == "swiglu" and cfg.model.logit_softcap == 30 and cfg.model.qk_norm is True
    assert load_config(None, ["model.recipe=parcae_reference"]).model.value_embeddings is True
    with pytest.raises(ConfigError, match="model.recipe='flt'.*megaloop, flt_reference, parcae_reference"):
        load_config(None, ["model.recipe=flt"])
    with pytest.raises(ConfigError, match="model.init_scheme"):
        load_config(None, ["model.init_scheme=xavier"])


def test_saved_config_reads_back_the_same_after_the_table_changes(tmp_path, monkeypatch):
    cfg = load_config(TINY, ["model.recipe=flt_reference"])
    save_config(cfg, tmp_path / "config.yaml")
    monkeypatch.setitem(recipes.RECIPES, "flt_reference", {"mlp": "swiglu", "qk_norm": False})
    assert load_config(tmp_path / "config.yaml") == cfg
    # a config without the field (every saved run before it) is the megaloop recipe: defaults unchanged
    old = load_config(None)
    assert old.model.recipe == "megaloop" and old.model.init_scheme == "normal" and old.model.tie_embeddings


def test_the_baseline_lt_looped_in_training_is_warned_about():
    assert "model.injection: add" in recipes.collapse_warning(load_config(TINY))
    assert recipes.collapse_warning(load_config(TINY, ["loop.mean=1", "model.loops=1"])) is None
    # lt2_gates collapsed as well on the last loop's loss with a norm between loops; it ships in LT2's own loop
    # (no norm between loops, normalization inner), which kept it near R = 1 on the last loop's loss
    assert recipes.collapse_warning(load_config("yaml_configs/tiny/lt2_gates.yaml", ["model.normalization=outer"]))
    assert recipes.collapse_warning(load_config("yaml_configs/tiny/lt2_gates.yaml")) is None
    assert load_config("yaml_configs/tiny/lt2_gates.yaml").loop.loss == "last"
    assert recipes.collapse_warning(load_config(TINY, ["loop.loss=mean"])) is None
    assert recipes.collapse_warning(load_config(TINY, ["model.normalization=inner"])) is None
    assert recipes.collapse_warning(load_config("yaml_configs/tiny/ouro.yaml", ["loop.loss=last"]))
    for other in ("flt", "inject_add", "ouro", "plain", "lt2_gdn", "lt2_gdn_dsa", "lt2_hybrid"):
        assert recipes.collapse_warning(load_config(f"yaml_configs/tiny/{other}.yaml")) is None, other


def test_every_tiny_config_is_measured_at_its_r_or_says_why_not():
    """Each yaml_configs/tiny/*.yaml that loops has a row in docs/looped_models.md section 11's table (its
    loss at its own R vs R = 1, benchmarks/bench_loop_collapse.py, as the file ships, megaloop recipe), and one
    whose row says 'collapsed' says so in its own comments: no shipped config collapses silently."""
    import glob
    import os
    import re

    text = open("docs/looped_models.md").read()
    section = text[text.index("## 11."):]
    section = section[:section.index("\n## ", 5)] if "\n## " in section[5:] else section
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 6 and cells[1] == "megaloop" and re.fullmatch(r"\d+", cells[2]):
            rows.setdefault(cells[0].split()[0], []).append(cells[5])
    for path in sorted(glob.glob("yaml_configs/tiny/*.yaml")):
        name = os.path.basename(path)[:-5]
        cfg = load_config(path)
        if max(cfg.model.loops, cfg.loop.mean) <= 1:
            continue  # plain.yaml: R = 1, nothing to compare
        assert name in rows, f"{name}: no megaloop row in docs/looped_models.md section 11"
        if rows[name][0].startswith("collapsed"):  # (the first row: the config as it ships)
            comments = " ".join(line for line in open(path) if line.lstrip().startswith("#"))
            assert "collapse" in comments, f"{path} collapses at its R but does not say so"
