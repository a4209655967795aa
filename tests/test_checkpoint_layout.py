"""megaloop.checkpoint: which complete tag a path means (resume, export, generate and eval share
`resolve`), and the one-process model of a checkpoint (`load_model`, tools/consolidate.py). Real
DeepSpeed checkpoints of every layout are read in tests/test_export_checkpoint.py and
tests/test_train_engine.py."""
import pytest
import torch

from megaloop import checkpoint as ckpt
from megaloop.checkpoint import CheckpointError, resolve


def _tag(root, step, complete=True, states=True):
    d = root / ckpt.tag_for(step)
    d.mkdir(parents=True)
    if states:
        (d / "mp_rank_00_model_states.pt").write_bytes(b"")
    if complete:
        (d / ckpt.COMPLETE).write_text(f'{{"step": {step}, "consumed_samples": 0}}')
    return d


def test_tag_names():
    assert ckpt.tag_for(100) == "step_00000100" and ckpt.tag_step("step_00000100") == 100
    assert ckpt.tag_step("global_step100") is None and ckpt.TAG_RE.match(ckpt.tag_for(7))


def test_resolve_a_root_a_run_folder_and_a_tag(tmp_path):
    root = tmp_path / "run" / "checkpoints"
    t3, t6 = _tag(root, 3), _tag(root, 6)
    _tag(root, 9, complete=False)  # an interrupted save: skipped
    (root / "latest").write_text(t3.name)
    assert resolve(root) == t3  # `latest` names a complete tag
    (root / "latest").write_text(ckpt.tag_for(9))
    assert resolve(root) == t6  # `latest` names an incomplete tag: the newest complete one
    (root / "latest").unlink()
    assert resolve(root) == t6
    assert resolve(tmp_path / "run") == t6  # a run folder: its checkpoints/
    assert resolve(tmp_path / "run", 3) == t3 and resolve(root, 6) == t6
    assert resolve(t3) == t3 and resolve(t3, 3) == t3


def test_resolve_refuses_what_it_cannot_read(tmp_path):
    root = tmp_path / "checkpoints"
    _tag(root, 3)
    bad = _tag(root, 9, complete=False)
    with pytest.raises(CheckpointError, match="incomplete.*megaloop_complete.json"):
        resolve(bad)  # named by path
    with pytest.raises(CheckpointError, match="incomplete"):
        resolve(root, 9)  # named by step
    with pytest.raises(CheckpointError, match=r"no step 7 in .*steps there: 3, 9"):
        resolve(root, 7)
    with pytest.raises(CheckpointError, match="holds step 3"):
        resolve(root / ckpt.tag_for(3), 4)
    with pytest.raises(CheckpointError, match="does not exist"):
        resolve(tmp_path / "nowhere")
    empty = tmp_path / "empty"
    _tag(empty, 1, complete=False)
    with pytest.raises(CheckpointError, match="no complete checkpoint in"):
        resolve(empty)
    # required=False (a run's automatic resume): nothing there is not an error ...
    assert resolve(tmp_path / "nowhere", required=False) is None
    assert resolve(empty, required=False) is None
    # ... but an incomplete tag named explicitly still is
    with pytest.raises(CheckpointError, match="incomplete"):
        resolve(bad, required=False)


def test_load_model_and_consolidate_tool_on_a_plain_checkpoint(tmp_path, capsys):
    from megaloop.config import load_config
    from megaloop.model import build_model
    from tools.consolidate import main

    cfg = load_config(None, ["model.d_model=32", "model.n_heads=4", "model.vocab_size=100", "model.max_seq_len=16",
                             "data.seq_len=16"])
    torch.manual_seed(3)
    model = build_model(cfg)
    f = ckpt.save_plain_checkpoint(model, cfg, tmp_path / "run" / "step_5" / "model.pt")
    loaded, cfg2 = ckpt.load_model(tmp_path / "run", 5)
    assert cfg2.model == cfg.model
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())
    assert main([str(f), str(tmp_path / "out.pt")]) == 0
    assert "wrote" in capsys.readouterr().out
    sd, cfg3 = ckpt.load(tmp_path / "out.pt")
    assert cfg3.model == cfg.model and set(sd) == set(model.state_dict())
    assert main([str(tmp_path / "nowhere")]) == 2
    assert "does not exist" in capsys.readouterr().err
