"""export_hf refuses bad input with a clear message and writes nothing; the checkpoint seam."""
from pathlib import Path

import pytest
import torch

from megaloop.checkpoint import save_plain_checkpoint
from megaloop.export import ExportError, export_hf, load_checkpoint, load_merged_state_dict
from export_support import UNEXPORTABLE_CONFIGS, perturbed_model, tiny_config


@pytest.fixture(scope="module")
def lt():
    cfg = tiny_config("parcae")
    return cfg, perturbed_model(cfg).state_dict()


def _nothing_written(tmp_path):
    return list(tmp_path.iterdir()) == []


def _bad(sd, kind):
    sd = dict(sd)
    if kind == "missing":
        del sd["block.layers.1.mixer.wk.weight"]
    elif kind == "extra":
        sd["block.layers.2.mixer.wk.weight"] = sd["block.layers.1.mixer.wk.weight"]
    elif kind == "shape":  # half of a tensor-parallel shard
        sd["block.layers.0.mlp.w1.weight"] = sd["block.layers.0.mlp.w1.weight"][:96]
    elif kind == "nan":
        sd["block.injection.A_log"] = torch.full_like(sd["block.injection.A_log"], float("nan"))
    elif kind == "untied":
        sd["head.weight"] = sd["head.weight"] + 1
    return sd


@pytest.mark.parametrize("kind,pattern", [
    ("missing", r"1 missing key\(s\): block.layers.1.mixer.wk.weight"),
    ("extra", r"1 unexpected key\(s\): block.layers.2.mixer.wk.weight"),
    ("shape", r"block.layers.0.mlp.w1.weight: shape \(96, 64\), the config needs \(256, 64\)"),
    ("nan", r"block.injection.A_log: contains NaN"),
    ("untied", r"head.weight differs from embedding.weight"),
])
def test_bad_state_dict_is_refused_and_nothing_written(tmp_path, lt, kind, pattern):
    cfg, sd = lt
    with pytest.raises(ExportError, match=pattern):
        export_hf(_bad(sd, kind), cfg, cfg.data, tmp_path / "out")
    assert _nothing_written(tmp_path)


def test_existing_output_is_kept_unless_overwrite(tmp_path, lt):
    cfg, sd = lt
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="already exists"):
        export_hf(sd, cfg, cfg.data, out, verify=False)
    assert (out / "keep.txt").read_text() == "mine"
    # --overwrite replaces a previous export only, never someone's folder (tests/test_export_safety.py)
    with pytest.raises(ExportError, match="refusing to overwrite"):
        export_hf(sd, cfg, cfg.data, out, verify=False, overwrite=True)
    assert (out / "keep.txt").read_text() == "mine"
    (out / "keep.txt").unlink()
    export_hf(sd, cfg, cfg.data, out, verify=False, overwrite=True)  # an empty folder
    first = (out / "model.safetensors").stat().st_ino
    export_hf(sd, cfg, cfg.data, out, verify=False, overwrite=True)  # a previous export
    assert (out / "model.safetensors").is_file() and (out / "model.safetensors").stat().st_ino != first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp or old folders left


def test_a_failure_while_writing_leaves_nothing(tmp_path, lt, monkeypatch):
    cfg, sd = lt
    import megaloop.export.hf_export as hx

    def boom(*a, **k):
        raise ExportError("verification failed: simulated")
    monkeypatch.setattr(hx, "verify_export", boom)
    with pytest.raises(ExportError, match="simulated"):
        export_hf(sd, cfg, cfg.data, tmp_path / "out")
    assert _nothing_written(tmp_path)


def test_config_mismatch_and_bad_tokenizer(tmp_path, lt):
    cfg, sd = lt
    other = tiny_config("parcae", ["model.d_model=32"])
    with pytest.raises(ExportError, match="does not match the model config"):
        export_hf(sd, other, other.data, tmp_path / "out")
    with pytest.raises(ExportError, match="tokenizer"):
        export_hf(sd, cfg, {"type": "sentencepiece", "model": str(tmp_path / "missing.model")}, tmp_path / "out")
    assert _nothing_written(tmp_path)


def test_unimplemented_mixer_is_refused(tmp_path, monkeypatch):
    if UNEXPORTABLE_CONFIGS:
        cfg = tiny_config(UNEXPORTABLE_CONFIGS[0])
    else:  # every tiny config is exportable today: pretend the modeling file lacks Gated DeltaNet
        from megaloop.export.hf_template import modeling_megaloop

        monkeypatch.delitem(modeling_megaloop.MIXERS, "gdn")
        cfg = tiny_config("lt2_gdn")
    sd = perturbed_model(cfg).state_dict()
    with pytest.raises(ExportError, match=r"no implementation of the token mixer\(s\)"):
        export_hf(sd, cfg, cfg.data, tmp_path / "out")
    assert _nothing_written(tmp_path)


def test_checkpoint_seam_plain_and_deepspeed(tmp_path, lt):
    cfg, sd = lt
    model = perturbed_model(cfg)
    f = save_plain_checkpoint(model, cfg, tmp_path / "run" / "step_20" / "model.pt")
    (tmp_path / "run" / "model.pt").write_bytes(f.read_bytes())
    for src, step in ((f, None), (tmp_path / "run", 20), (tmp_path / "run", None)):
        sd2, cfg2, tok = load_checkpoint(src, step)
        assert cfg2.model == cfg.model and tok.tokenizer_type == "byte"
        assert all(torch.equal(sd2[k], v) for k, v in model.state_dict().items())
    with pytest.raises(ExportError, match="no step 7"):
        load_merged_state_dict(tmp_path / "run", 7)
    # DeepSpeed-style directories without a complete megaloop checkpoint: a clear ExportError
    # (tests/test_export_checkpoint.py reads real ones).
    ds = tmp_path / "ds"
    (ds / "global_step10").mkdir(parents=True)
    (ds / "latest").write_text("global_step10")
    with pytest.raises(ExportError, match="no step 10 in"):
        load_merged_state_dict(ds, 10)
    with pytest.raises(ExportError, match="no complete checkpoint"):
        load_checkpoint(ds)
    tagged = tmp_path / "tagged" / "step_00000010"  # megaloop/training's layout, interrupted before the marker
    tagged.mkdir(parents=True)
    (tagged / "mp_rank_00_model_states.pt").write_bytes(b"")
    for p in (tagged.parent, tagged):
        with pytest.raises(ExportError, match="incomplete|no complete checkpoint"):
            load_merged_state_dict(p)


def test_export_tool(tmp_path, lt, capsys):
    from tools.export_hf import main

    cfg, _ = lt
    save_plain_checkpoint(perturbed_model(cfg), cfg, tmp_path / "run" / "step_5" / "model.pt")
    assert main(["--checkpoint", str(tmp_path / "run"), "--step", "5", "--output", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "model.safetensors").is_file()
    assert main(["--checkpoint", str(tmp_path / "run"), "--step", "5", "--output", str(tmp_path / "out")]) == 2
    assert "already exists" in capsys.readouterr().err
    (tmp_path / "ds" / "step_00000001").mkdir(parents=True)
    (tmp_path / "ds" / "step_00000001" / "mp_rank_00_model_states.pt").write_bytes(b"")
    assert main(["--checkpoint", str(tmp_path / "ds"), "--output", str(tmp_path / "out2")]) == 2
    assert "megaloop_complete.json" in capsys.readouterr().err and not (tmp_path / "out2").exists()
