"""init.from (issue 15): a new run takes its first weights from another run's checkpoint, whatever either
layout is, with a fresh optimizer at step 0; a resume of that run continues from its own checkpoints.
The reference is the source model itself (megaloop.checkpoint.load_model, one process) on the new run's
first batch."""
import math
import os

import pytest
import torch

from test_train_support import assert_ok, make_byte_dataset, run_ranks, tiny_config, train_rows, write_config

from megaloop.checkpoint import CheckpointError, load_model
from megaloop.config import ConfigError, config_from_dict, load_config


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A one-rank run of 3 steps (TP = PP = 1, ZeRO 0): its final checkpoint is the init source."""
    tmp = tmp_path_factory.mktemp("init_from")
    data = make_byte_dataset(str(tmp / "data"))
    out = str(tmp / "src")
    cfg = tiny_config(data, out, train={"steps": 3, "log_interval": 1})
    assert_ok(run_ranks(1, ["--config", write_config(str(tmp / "src.yaml"), cfg)], timeout=120))
    return tmp, data, out


def _first_batch_loss(model, cfg_dict) -> float:
    """The source model's loss on the first micro-batch a run of `cfg_dict` trains on (one DP rank)."""
    from megaloop.training.data import TrainBatches, build_split_datasets, build_tokenizer_for
    cfg = config_from_dict(cfg_dict)
    ds = build_split_datasets(cfg, cfg.train.steps * cfg.train.micro_batch_size, 0, build_tokenizer_for(cfg))
    (tokens, loops), labels = next(TrainBatches(ds["train"], cfg, 0, 1))
    with torch.no_grad():
        return float(model.eval()(tokens, labels=labels, loops=int(loops[0])).loss)


@pytest.mark.parametrize("name, parallel", [("tp2", {"tensor_parallel": 2}),
                                            ("pp2", {"pipeline_parallel": 2, "zero_stage": 1})])
def test_a_two_rank_run_starts_from_a_one_rank_checkpoint_with_its_loss(source, name, parallel):
    tmp, data, src = source
    out = str(tmp / name)
    cfg = tiny_config(data, out, train={"steps": 1, "log_interval": 1}, parallel=parallel, init={"from": src})
    results = run_ranks(2, ["--config", write_config(str(tmp / f"{name}.yaml"), cfg)], timeout=150)
    assert_ok(results)
    text = "".join(out for _, out in results)  # (with PP the last stage logs)
    assert "initialised the weights from" in text and "step_00000003" in text
    got = train_rows(out)[1]["loss"]
    model, _ = load_model(src)
    ref = _first_batch_loss(model, cfg)
    print(f"{name} first-step loss {got:.6f}, source model on that batch {ref:.6f}")
    assert math.isclose(got, ref, rel_tol=1e-5), (got, ref)
    # A fresh model would have a loss near ln(258) = 5.55; the 3-step source is already below it.
    fresh = config_from_dict(cfg)
    from megaloop.model import build_model
    torch.manual_seed(fresh.train.seed)
    assert abs(_first_batch_loss(build_model(fresh), cfg) - ref) > 1e-3


def test_resume_of_an_init_run_continues_from_its_own_checkpoint(source):
    tmp, data, src = source
    out = str(tmp / "own")
    cfg = tiny_config(data, out, train={"steps": 2, "log_interval": 1, "lr": 1e-2}, init={"from": src})
    path = write_config(str(tmp / "own.yaml"), cfg)
    assert_ok(run_ranks(1, ["--config", path], timeout=120))
    first = train_rows(out)
    cfg["train"]["steps"] = 3
    write_config(path, cfg)
    results = run_ranks(1, ["--config", path], timeout=120)
    assert_ok(results)
    assert "resumed from" in results[0][1] and "step_00000002" in results[0][1]
    assert "init.from is not re-applied" in results[0][1]
    assert "initialised the weights" not in results[0][1]
    rows = train_rows(out)
    assert sorted(rows) == [1, 2, 3] and rows[2]["loss"] == first[2]["loss"]
    # Step 3 is trained from the run's own step-2 weights, not from the source's.
    own, _ = load_model(os.path.join(out, "checkpoints", "step_00000002"))
    batches_cfg = dict(cfg, train=dict(cfg["train"]))
    ref3 = _third_batch_loss(own, batches_cfg)
    assert math.isclose(rows[3]["loss"], ref3, rel_tol=1e-5), (rows[3]["loss"], ref3)


def _third_batch_loss(model, cfg_dict) -> float:
    from megaloop.training.data import TrainBatches, build_split_datasets, build_tokenizer_for
    cfg = config_from_dict(cfg_dict)
    ds = build_split_datasets(cfg, cfg.train.steps * cfg.train.micro_batch_size, 0, build_tokenizer_for(cfg))
    it = TrainBatches(ds["train"], cfg, 0, 1)
    next(it), next(it)
    (tokens, loops), labels = next(it)
    with torch.no_grad():
        return float(model.eval()(tokens, labels=labels, loops=int(loops[0])).loss)


def test_mismatched_model_is_refused_naming_the_key(source):
    from megaloop.checkpoint.init_weights import init_state_dict
    tmp, data, src = source
    base = config_from_dict(tiny_config(data, str(tmp / "x"))).model
    sd, note = init_state_dict(src, base)
    assert "step_00000003" in note and sorted(sd) == sorted(load_model(src)[0].state_dict())
    wider = config_from_dict(tiny_config(data, str(tmp / "x"), model={"d_model": 64})).model
    with pytest.raises(CheckpointError, match=r"'embedding.weight' has shape \(320, 32\) in the source, this "
                                              r"run's model needs \(320, 64\)"):
        init_state_dict(src, wider)
    deeper = config_from_dict(tiny_config(data, str(tmp / "x"), model={"n_loop": 2})).model
    with pytest.raises(CheckpointError, match=r"no tensor 'block.layers.1.[a-z_.]+'.* which this run's model needs"):
        init_state_dict(src, deeper)
    shallower = config_from_dict(tiny_config(data, str(tmp / "x"), model={"n_prelude": 0, "n_loop": 1})).model
    shallower.exit_gate = True
    with pytest.raises(CheckpointError, match="no tensor 'exit_gate"):
        init_state_dict(src, shallower)
    # Vocab padding is not a mismatch: TP may need another pad_vocab_multiple.
    padded = config_from_dict(tiny_config(data, str(tmp / "x"), model={"pad_vocab_multiple": 128})).model
    sd2, _ = init_state_dict(src, padded)
    assert sd2["embedding.weight"].shape[0] == 384
    assert torch.equal(sd2["embedding.weight"][:258], sd["embedding.weight"][:258])
    with pytest.raises(CheckpointError, match="init.from .*nowhere: does not exist"):
        init_state_dict(str(tmp / "nowhere"), base)


def test_init_section_is_validated():
    cfg = load_config(None, ["init.from=runs/a"])
    assert cfg.init.from_ == "runs/a" and cfg.to_dict()["init"] == {"from": "runs/a", "convert_mixers": None}
    assert config_from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="init.from='runs/a' and train.load='runs/b' are both set"):
        load_config(None, ["init.from=runs/a", "train.load=runs/b"])
    with pytest.raises(ConfigError, match="init.from is empty"):
        load_config(None, ["init.from= "])
    with pytest.raises(ConfigError, match=r"unknown key 'frm' in 'init' \(did you mean 'from'\?\)"):
        load_config(None, ["init.frm=x"])


def test_the_trainer_refuses_a_mismatched_source_in_one_line(source):
    tmp, data, src = source
    cfg = tiny_config(data, str(tmp / "bad"), model={"n_kv_heads": 2}, init={"from": src})
    results = run_ranks(1, ["--config", write_config(str(tmp / "bad.yaml"), cfg)], timeout=120)
    rc, out = results[0]
    assert rc == 2, out
    line = [ln for ln in out.splitlines() if ln.startswith("error:")]
    assert len(line) == 1 and "'block.layers.0.mixer.wk.weight' has shape (32, 32) in the source" in line[0], out
    assert not os.path.isdir(os.path.join(str(tmp / "bad"), "checkpoints", "step_00000001"))
