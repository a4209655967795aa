"""Issue 12, item 2: tools/export_hf.py never deletes what it reads or what it did not write.

--output may not be the checkpoint being read, contain it, or lie inside its checkpoint tree; --overwrite
replaces only a folder holding a previous export. Every refusal is one line naming the folder, rc 1, and
nothing is deleted or written."""
import os
from pathlib import Path

import pytest

from megaloop.checkpoint import save_plain_checkpoint
from megaloop.export import ExportError, export_hf
from export_support import perturbed_model, tiny_config


@pytest.fixture(scope="module")
def lt():
    cfg = tiny_config("plain")
    return cfg, perturbed_model(cfg)


def _tree(root: Path) -> dict:
    """Every file under root with its bytes (what must survive a refusal)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _fake_run(root: Path, cfg, model) -> Path:
    """A training-run-like folder: a checkpoint plus the run's other outputs (metrics, TensorBoard)."""
    run = root / "run"
    save_plain_checkpoint(model, cfg, run / "model.pt")
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 5.0}\n')
    (run / "tensorboard").mkdir()
    (run / "tensorboard" / "events.out.tfevents.1").write_bytes(b"tb")
    return run


def _main(args):
    from tools.export_hf import main

    return main(args + ["--no-verify"])


def _one_line_err(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err
    return err


@pytest.mark.parametrize("where", ["same", "parent", "symlink"])
def test_output_that_is_or_contains_the_checkpoint_is_refused(tmp_path, lt, capsys, where):
    cfg, model = lt
    run = _fake_run(tmp_path, cfg, model)
    out = {"same": run, "parent": tmp_path, "symlink": tmp_path / "link"}[where]
    if where == "symlink":
        os.symlink(run, out)
    before = _tree(tmp_path)
    assert _main(["--checkpoint", str(run), "--output", str(out), "--overwrite"]) == 2
    err = _one_line_err(capsys)
    assert "checkpoint" in err and str(run) in err, err
    assert _tree(tmp_path) == before  # nothing deleted, nothing written


def test_output_inside_the_checkpoint_tree_is_refused(tmp_path, lt, capsys):
    """A training run's checkpoints/ tree (DeepSpeed layout) may not receive the export; the
    documented runs/X/hf beside it stays allowed."""
    cfg, model = lt
    run = tmp_path / "run"
    tag = run / "checkpoints" / "step_00000002"
    tag.mkdir(parents=True)
    (run / "checkpoints" / "latest").write_text("step_00000002")
    (tag / "megaloop_complete.json").write_text("{}")
    (tag / "mp_rank_00_model_states.pt").write_bytes(b"not read")
    before = _tree(tmp_path)
    for out in (run / "checkpoints", run / "checkpoints" / "hf", tag / "hf", tag):
        assert _main(["--checkpoint", str(run), "--output", str(out), "--overwrite"]) == 2
        err = _one_line_err(capsys)
        assert "checkpoint" in err and str(out) in err, err
        assert _main(["--checkpoint", str(tag), "--output", str(out)]) == 2
        _one_line_err(capsys)
    assert _tree(tmp_path) == before


def test_the_documented_hf_subfolder_of_a_run_is_allowed(tmp_path, lt):
    cfg, model = lt
    run = _fake_run(tmp_path, cfg, model)
    kept = _tree(run)
    assert _main(["--checkpoint", str(run), "--output", str(run / "hf")]) == 0
    assert (run / "hf" / "model.safetensors").is_file()
    assert _main(["--checkpoint", str(run), "--output", str(run / "hf"), "--overwrite"]) == 0  # re-export
    assert {k: v for k, v in _tree(run).items() if not k.startswith("hf/")} == kept
    assert sorted(p.name for p in run.iterdir()) == ["hf", "metrics.jsonl", "model.pt", "tensorboard"]


@pytest.mark.parametrize("content", ["user_files", "export_plus_user_file", "a_file"])
def test_overwrite_refuses_a_folder_that_is_not_a_previous_export(tmp_path, lt, capsys, content):
    cfg, model = lt
    run = _fake_run(tmp_path, cfg, model)
    out = tmp_path / "out"
    if content == "user_files":
        out.mkdir()
        (out / "thesis.tex").write_text("years of work")
        (out / "config.json").write_text('{"model_type": "bert"}')
    elif content == "export_plus_user_file":
        export_hf(model.state_dict(), cfg, cfg.data, out, verify=False)
        (out / "notes.txt").write_text("mine")
    else:
        out.write_text("a file, not a folder")
    before = _tree(tmp_path)
    assert _main(["--checkpoint", str(run), "--output", str(out), "--overwrite"]) == 2
    err = _one_line_err(capsys)
    assert str(out) in err and "previous" in err and "export" in err, err
    if content == "export_plus_user_file":
        assert "notes.txt" in err, err
    assert _tree(tmp_path) == before


def test_overwrite_replaces_a_previous_export_and_an_empty_folder(tmp_path, lt):
    cfg, model = lt
    run = _fake_run(tmp_path, cfg, model)
    out = tmp_path / "out"
    assert _main(["--checkpoint", str(run), "--output", str(out)]) == 0
    first = (out / "model.safetensors").stat().st_ino
    assert _main(["--checkpoint", str(run), "--output", str(out), "--overwrite"]) == 0
    assert (out / "model.safetensors").stat().st_ino != first
    empty = tmp_path / "empty"
    empty.mkdir()
    assert _main(["--checkpoint", str(run), "--output", str(empty), "--overwrite"]) == 0
    assert (empty / "config.json").is_file()
    # a llama-format export is a previous export too
    llama = tmp_path / "llama"
    assert _main(["--checkpoint", str(run), "--output", str(llama), "--format", "llama"]) == 0
    assert _main(["--checkpoint", str(run), "--output", str(llama), "--format", "llama", "--overwrite"]) == 0


def test_library_call_refuses_to_replace_a_non_export(tmp_path, lt):
    """export_hf(overwrite=True) applies the same rule as the tool (it is the last line of defence)."""
    cfg, model = lt
    out = tmp_path / "precious"
    out.mkdir()
    (out / "data.bin").write_bytes(b"\x00" * 10)
    with pytest.raises(ExportError, match="previous") as err:
        export_hf(model.state_dict(), cfg, cfg.data, out, verify=False, overwrite=True)
    assert "\n" not in str(err.value)
    assert (out / "data.bin").read_bytes() == b"\x00" * 10
    assert sorted(p.name for p in tmp_path.iterdir()) == ["precious"]
