import pytest

from megaloop.config import ConfigError, load_config


def test_defaults_validate_and_overrides_convert_types(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("model:\n  d_model: 32\n  n_heads: 4\ntrain:\n  lr: 1.0e-3\n")
    cfg = load_config(p, ["model.loops=7", "model.qk_norm=true", "train.lr=2e-3", "model.logit_softcap=null"])
    assert cfg.model.d_model == 32 and cfg.model.loops == 7 and cfg.model.qk_norm is True
    assert cfg.train.lr == pytest.approx(2e-3) and cfg.model.logit_softcap is None


def test_override_into_section_missing_from_yaml():
    cfg = load_config(None, ["model.injection=parcae", "model.normalization=inner"])
    assert cfg.model.injection == "parcae" and cfg.model.normalization == "inner"


@pytest.mark.parametrize("override, words", [
    (["model.d_modle=64"], ["d_modle", "d_model"]),
    (["modle.d_model=64"], ["modle", "model"]),
    (["train.stepz=3"], ["stepz", "steps"]),
])
def test_unknown_key_names_the_nearest_valid_one(override, words):
    with pytest.raises(ConfigError) as err:
        load_config(None, override)
    for w in words:
        assert w in str(err.value)


def test_unknown_key_in_yaml(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("model:\n  n_kv_head: 2\n")
    with pytest.raises(ConfigError, match="n_kv_heads"):
        load_config(p)


@pytest.mark.parametrize("override, words", [
    (["model.n_heads=4", "model.n_kv_heads=3"], ["n_heads=4", "n_kv_heads=3"]),
    (["model.arch=flt", "model.injection=add"], ["injection", "flt"]),
    (["model.recall=internal"], ["recall", "injection"]),
    (["model.injection=parcae"], ["parcae", "normalization"]),
    (["model.arch=flt_ress"], ["flt_res"]),
    (["model.d_model=60", "model.n_heads=8"], ["d_model=60", "n_heads=8"]),
    (["loop.loss=exit_weighted"], ["exit_gate"]),
    (["model.loops=two"], ["model.loops", "integer"]),
    (["parallel.tensor_parallel=3"], ["tensor_parallel=3", "n_heads"]),
    (["parallel.pipeline_parallel=2", "parallel.zero_stage=2"], ["zero_stage=2", "pipeline"]),
    (["data.seq_len=1024"], ["seq_len=1024", "max_seq_len"]),
])
def test_impossible_combinations_name_the_fields(override, words):
    with pytest.raises(ConfigError) as err:
        load_config(None, override)
    for w in words:
        assert w in str(err.value), str(err.value)


def test_missing_file_and_bad_override_syntax(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(None, ["model.d_model"])


def test_every_shipped_yaml_loads():
    import glob
    root = __import__("pathlib").Path(__file__).resolve().parents[1]
    paths = sorted(glob.glob(str(root / "yaml_configs/**/*.yaml"), recursive=True))
    assert paths
    for p in paths:
        load_config(p)
