"""Issue 12, items 6 and 7: YAML oddities and out-of-range numbers are refused in one line naming the
place (file:line for YAML, the field and its allowed range for values), never accepted silently."""
import glob
import dataclasses
import typing
from pathlib import Path

import pytest

from megaloop.config import Config, ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]


def _load_text(tmp_path, text, overrides=None):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p, (lambda: load_config(p, overrides))


def _one_line(err) -> str:
    msg = str(err.value)
    assert "\n" not in msg, msg
    return msg


# ---------------------------------------------------------------------------------------------
# Item 6: YAML oddities


def test_duplicate_key_in_a_section_is_refused_with_both_lines(tmp_path):
    p, load = _load_text(tmp_path, "model:\n  d_model: 64\n  n_heads: 4\n  d_model: 128\n")
    with pytest.raises(ConfigError) as err:
        load()
    msg = _one_line(err)
    assert f"{p}:4:" in msg and "duplicate key 'd_model'" in msg and "first given at line 2" in msg, msg


def test_duplicate_key_in_a_flow_mapping_and_at_the_top_level(tmp_path):
    _, load = _load_text(tmp_path, "model: {d_model: 64, d_model: 128}\n")
    with pytest.raises(ConfigError, match=r"c.yaml:1: duplicate key 'd_model'"):
        load()
    _, load = _load_text(tmp_path, "model:\n  d_model: 64\ntrain:\n  steps: 3\nmodel:\n  n_heads: 2\n")
    with pytest.raises(ConfigError, match=r"c.yaml:5: duplicate key 'model' \(first given at line 1\)"):
        load()


@pytest.mark.parametrize("text, words", [
    ("- [model, {d_model: 64}]\n- [train, {steps: 3}]\n", ["top level", "mapping", "list", "line 1"]),
    ("just a string\n", ["top level", "mapping", "line 1"]),
    ("model: 0\n", ["section 'model'", "mapping", "got 0", "line 1"]),
    ("train:\n  steps: 3\nmodel: false\n", ["section 'model'", "mapping", "got False", "line 3"]),
    ("model: []\n", ["section 'model'", "mapping", "line 1"]),
    ("model: d_model=64\n", ["section 'model'", "mapping", "d_model=64", "line 1"]),
])
def test_non_mapping_top_level_or_section_is_refused(tmp_path, text, words):
    p, load = _load_text(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load()
    msg = _one_line(err)
    for w in [str(p)] + words:
        assert w in msg, msg


def test_empty_file_and_empty_section_are_still_defaults(tmp_path):
    _, load = _load_text(tmp_path, "")
    assert load() == load_config(None)
    _, load = _load_text(tmp_path, "# nothing yet\nmodel:\ntrain:\n  steps: 3\n")
    assert load().model == load_config(None).model


@pytest.mark.parametrize("text, line", [
    ("model:\n  d_model: 64\n n_heads: 4\n", 3),           # bad indentation
    ("model:\n  d_model: [64\ntrain:\n  steps: 3\n", 3),   # unclosed flow sequence
    ("model:\n  d_model: 64\n\t n_heads: 4\n", 3),         # a tab
])
def test_yaml_syntax_error_is_one_line_naming_file_and_line(tmp_path, text, line):
    p, load = _load_text(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load()
    msg = _one_line(err)
    assert f"{p}:{line}" in msg and "YAML" in msg, msg


def test_config_from_dict_refuses_a_non_mapping_section():
    from megaloop.config import config_from_dict

    for bad in (0, False, "", []):
        with pytest.raises(ConfigError, match="model.*mapping"):
            config_from_dict({"model": bad})
    assert config_from_dict({"model": None}).model == load_config(None).model
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        config_from_dict([["model", {"d_model": 64}]])  # dict() would take a list of pairs
    with pytest.raises(ConfigError, match="section 'model' must be a mapping"):
        config_from_dict({"model": 0}, ["model.d_model=64"])  # an override does not paper over it


# ---------------------------------------------------------------------------------------------
# Item 7: every numeric field is range-checked

# field -> (an invalid value, words the message must hold). Every int / float field of every section
# must be listed here (test_every_numeric_field_is_covered), so a new field needs a check too.
BAD_VALUES = {
    "model.vocab_size": ("0", "> 0"),
    "model.pad_vocab_multiple": ("0", ">= 1"),
    "model.max_seq_len": ("0", "> 0"),
    "model.d_model": ("-64", "> 0"),
    "model.n_heads": ("0", "> 0"),
    "model.n_kv_heads": ("0", "> 0"),
    "model.head_dim": ("-16", "> 0"),
    "model.ffn_hidden": ("-1", "> 0"),
    "model.norm_eps": ("0", "> 0"),
    "model.rope_theta": ("-1", "> 0"),
    "model.logit_softcap": ("inf", "finite"),
    "model.init_std": ("-0.02", "> 0"),
    "model.dropout": ("1.0", "[0, 1)"),
    "model.conv_size": ("0", "> 0"),
    "model.gdn_expand_v": ("nan", "> 0"),
    "model.gdn_chunk_size": ("0", "> 0"),
    "model.window": ("0", "> 0"),
    "model.dsa_topk": ("0", "> 0"),
    "model.dsa_index_heads": ("0", "> 0"),
    "model.dsa_index_dim": ("0", "> 0"),
    "model.dsa_indexer_loss_coef": ("-0.1", ">= 0"),
    "model.dsa_index_rope_dim": ("-2", ">= 0"),
    "model.n_prelude": ("-1", ">= 0"),
    "model.n_loop": ("0", "> 0"),
    "model.n_coda": ("-1", ">= 0"),
    "model.loops": ("0", "> 0"),
    "model.max_loops": ("0", "> 0"),
    "model.state_init_std": ("-1", "> 0"),
    "model.parcae_init_decay": ("1.0", "(0, 1)"),
    "model.embed_scale": ("0", "> 0"),
    "loop.mean": ("nan", "finite"),
    "loop.sigma": ("-0.5", ">= 0"),
    "loop.min": ("0", "loop.min"),
    "loop.max": ("0", "loop.max"),
    "loop.backprop_loops": ("0", ">= 1"),
    "loop.exit_entropy_weight": ("-1", ">= 0"),
    "data.seq_len": ("0", "> 0"),
    "data.num_workers": ("-1", ">= 0"),
    "train.seed": ("-1", "[0, 4294967295]"),
    "train.steps": ("0", "> 0"),
    "train.micro_batch_size": ("0", "> 0"),
    "train.grad_accum_steps": ("0", "> 0"),
    "train.lr": ("nan", "finite"),
    "train.min_lr": ("-1e-4", "min_lr"),
    "train.warmup_steps": ("-5", ">= 0"),
    "train.wsd_decay_fraction": ("1.5", "(0, 1]"),
    "train.weight_decay": ("-0.1", ">= 0"),
    "train.beta1": ("1.5", "[0, 1)"),
    "train.beta2": ("1.0", "[0, 1)"),
    "train.eps": ("0", "> 0"),
    "train.muon_lr": ("0", "> 0"),
    "train.muon_momentum": ("1", "[0, 1)"),
    "train.grad_clip": ("-1", ">= 0"),
    "train.log_interval": ("0", "> 0"),
    "train.eval_interval": ("-1", ">= 0"),
    "train.eval_iters": ("-1", ">= 0"),
    "train.save_interval": ("-1", ">= 0"),
    "train.keep_checkpoints": ("-1", ">= 0"),
    "train.max_consecutive_skips": ("0", "> 0"),
    "train.eval_loops": ("0", "> 0"),
    "train.loss_scale": ("nan", "finite"),
    "train.initial_scale_power": ("-1", "[0, 64]"),
    "train.peak_flops": ("inf", "finite"),
    "train.dist_timeout": ("0", "> 0"),
    "train.sample_tokens": ("-1", ">= 0"),
    "train.sample_temperature": ("-0.8", ">= 0"),
    "train.sample_top_k": ("-1", ">= 0"),
    "train.exit_gate_margin": ("-0.1", ">= 0"),
    "train.exit_gate_slope": ("0", "> 0"),
    "train.distill.kl_weight": ("-1", ">= 0"),
    "train.distill.ce_weight": ("nan", "finite"),
    "train.distill.temperature": ("0", "> 0"),
    "train.distill.warmup_steps": ("-1", ">= 0"),
    "train.diag_interval": ("-1", ">= 0"),
    "train.time_limit_margin": ("-5", ">= 0"),
    "train.profile.start": ("0", ">= 1"),
    "train.profile.steps": ("-1", ">= 0"),
    "train.profile.ranks": ("[-1]", "list of global ranks"),
    "train.harness_interval": ("-1", ">= 0"),
    "train.harness_limit": ("0", "> 0"),
    "parallel.tensor_parallel": ("0", "> 0"),
    "parallel.pipeline_parallel": ("0", "> 0"),
    "parallel.zero_stage": ("4", "zero_stage"),
    "parallel.expected_world_size": ("-1", ">= 0"),
}


def _numeric_fields(cls=Config, prefix=""):
    out = []
    for name, ann in typing.get_type_hints(cls).items():
        if dataclasses.is_dataclass(ann):  # a section, or a nested one (train.distill)
            out += _numeric_fields(ann, f"{prefix}{name}.")
            continue
        args = set(typing.get_args(ann)) - {type(None)} or {ann}
        if args & {int, float}:
            out.append(f"{prefix}{name}")
    return out


def test_every_numeric_field_is_covered():
    missing = sorted(set(_numeric_fields()) - set(BAD_VALUES))
    assert not missing, f"numeric config fields without a range check in this table: {missing}"


@pytest.mark.parametrize("field", sorted(BAD_VALUES))
def test_out_of_range_value_is_refused_naming_the_field(field):
    value, words = BAD_VALUES[field]
    with pytest.raises(ConfigError) as err:
        load_config(None, [f"{field}={value}"])
    msg = _one_line(err)
    assert field in msg and words in msg, msg


@pytest.mark.parametrize("field", ["train.lr", "train.min_lr", "train.beta1", "train.beta2", "train.eps",
                                   "train.weight_decay", "train.grad_clip", "model.norm_eps", "model.init_std",
                                   "model.rope_theta", "loop.sigma", "train.dist_timeout", "train.loss_scale"])
@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_non_finite_floats_are_refused(field, value):
    with pytest.raises(ConfigError) as err:
        load_config(None, [f"{field}={value}"])
    assert field in _one_line(err)


@pytest.mark.parametrize("overrides", [
    ["train.warmup_steps=0", "train.grad_clip=0", "train.weight_decay=0", "train.beta1=0", "train.beta2=0"],
    ["train.min_lr=0", "train.eval_iters=0", "train.sample_temperature=0", "train.sample_top_k=0",
     "train.diag_interval=0"],
    ["model.dropout=0", "model.dsa_indexer_loss_coef=0", "loop.sigma=0", "loop.exit_entropy_weight=0"],
    ["model.pad_vocab_multiple=1", "train.seed=0", "train.initial_scale_power=0", "data.num_workers=0"],
    ["train.lr_schedule=wsd", "train.wsd_decay_fraction=1"],
    ["model.ffn_hidden=100", "model.head_dim=8", "model.state_init_std=0.6", "model.logit_softcap=30"],
])
def test_boundary_values_stay_allowed(overrides):
    load_config(None, overrides)


@pytest.mark.parametrize("path", sorted(glob.glob(str(ROOT / "yaml_configs/**/*.yaml"), recursive=True)))
def test_every_shipped_config_still_validates(path):
    load_config(path)
