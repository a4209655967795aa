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
    # evaluation (megaloop/config/evaluation.py)
    (["train.eval_loops=[1, 0]"], ["train.eval_loops", "> 0"]),
    (["train.eval_exits=[kl1e-3]"], ["train.eval_exits", "strategy:threshold"]),
    (["train.eval_exits=[q_exit:0.5]"], ["q_exit", "model.exit_gate"]),
    (["train.eval_exits=[kl:1e-3]", "parallel.pipeline_parallel=2"], ["train.eval_exits", "pipeline_parallel=1"]),
    (["data.valid_data_path={'wiki text': [a]}"], ["data.valid_data_path", "'wiki text'"]),
    (["data.test_data_path={t: []}"], ["data.test_data_path", "names no dataset"]),
    (["data.task=parity", "data.valid_data_path=[a]"], ["data.valid_data_path", "data.task"]),
    (["train.harness_interval=100"], ["train.harness_interval", "train.harness_tasks"]),
    (["train.harness_interval=100", "train.harness_tasks=[x]", "parallel.tensor_parallel=2"],
     ["train.harness_interval", "tensor_parallel=1"]),
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


def test_validation_sets_parse_as_blends_or_named_blends():
    from megaloop.config.schema import named_blends
    named = load_config(None, ["data.valid_data_path={wiki: [w], mix: [0.5, a, 0.5, b]}"]).data.valid_data_path
    assert named_blends(named, "valid") == {"wiki": ["w"], "mix": [0.5, "a", 0.5, "b"]}
    assert named_blends(load_config(None, ["data.valid_data_path=w"]).data.valid_data_path, "valid") == {"valid": ["w"]}
    assert named_blends(load_config(None, ["data.test_data_path=[0.3, a, 0.7, b]"]).data.test_data_path, "test") == \
        {"test": [0.3, "a", 0.7, "b"]}
