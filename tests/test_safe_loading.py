"""Issue 21 item 2, "loading never executes code from files megaloop did not write": a pickle whose __reduce__
creates a marker folder is handed to every loader (init.from, export_hf --checkpoint, generate --model,
eval_loops --model, train.distill.teacher, consolidate, the resume of a downloaded run: its model states and its
rng_rank*.pt); each refuses it in one line naming the file and the callable, and the marker never appears.
Loaders run in-process (the tools through their main(argv)); megaloop's own files still load."""
from __future__ import annotations

import json
import os
import pickle

import pytest
import torch

from export_support import perturbed_model, tiny_config
from megaloop.checkpoint import CheckpointError, load_model, save_plain_checkpoint
from megaloop.checkpoint.layout import COMPLETE
from megaloop.config import save_config


class Planted:
    """What an attacker's model.pt holds: unpickling it calls os.mkdir(marker)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    root = tmp_path_factory.mktemp("planted")
    marker = root / "PWNED"
    cfg = tiny_config("plain")
    evil = {"model": {"embedding.weight": torch.zeros(2)}, "config": cfg.to_dict(), "x": Planted(marker)}
    plain = root / "plain"
    plain.mkdir()
    torch.save(evil, plain / "model.pt")
    save_config(cfg, plain / "config.yaml")
    legacy = root / "legacy"  # a bare pickle (not torch.save's zip archive)
    legacy.mkdir()
    (legacy / "model.pt").write_bytes(pickle.dumps(evil))
    save_config(cfg, legacy / "config.yaml")

    def tag(name, files):
        d = root / name / "checkpoints" / "step_00000001"
        d.mkdir(parents=True)
        for fname, obj in files.items():
            torch.save(obj, d / fname)
        (d / COMPLETE).write_text(json.dumps({"step": 1, "consumed_samples": 4}))
        (d.parent / "latest").write_text(d.name)
        return root / name

    meta = {"config": cfg.to_dict(), "dp_world_size": 1, "ds_config": {"zero_optimization": {"stage": 3}}}
    runs = {
        "model_states": tag("ds_meta", {"mp_rank_00_model_states.pt": {"config": Planted(marker)}}),
        "zero3_optim": tag("ds_zero3", {"zero_pp_rank_0_mp_rank_00_model_states.pt": meta,
                                        "zero_pp_rank_0_mp_rank_00_optim_states.pt": {"o": Planted(marker)}}),
        "rng": tag("ds_rng", {"mp_rank_00_model_states.pt": {"config": cfg.to_dict()},
                              "rng_rank00000.pt": {"torch": Planted(marker)}}),
    }
    return {"root": root, "marker": marker, "cfg": cfg, "plain": plain, "legacy": legacy, **runs}


def _refused(planted, call, *must):
    with pytest.raises(Exception) as err:
        call()
    assert not planted["marker"].exists(), "the planted pickle ran"
    text = str(err.value)
    assert "\n" not in text and "refused" in text, text
    for m in must:
        assert m in text, (m, text)
    return err.value


def _tool_refused(planted, capsys, tool, argv, *must):
    import importlib
    code = importlib.import_module(f"tools.{tool}").main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert not planted["marker"].exists(), "the planted pickle ran"
    lines = [line for line in err.splitlines() if line.startswith("error: ")]  # (export_hf says what it reads)
    assert code == 2 and len(lines) == 1 and "refused" in lines[0] and "Traceback" not in err, err
    for m in must:
        assert m in lines[0], (m, lines[0])


@pytest.mark.parametrize("source", ["plain", "legacy", "model_states"])
def test_init_from_and_the_distill_teacher_refuse_a_planted_pickle(planted, source):
    from megaloop.checkpoint.init_weights import init_state_dict
    from megaloop.config import ConfigError
    from megaloop.training.distill import Distiller

    cfg = planted["cfg"]
    _refused(planted, lambda: init_state_dict(planted[source], cfg.model), "init.from", "model")
    cfg = tiny_config("plain", [f"train.distill.teacher={planted[source]}"])
    err = _refused(planted, lambda: Distiller(cfg, None, "cpu"), "train.distill.teacher")
    assert isinstance(err, ConfigError)


@pytest.mark.parametrize("tool, argv", [
    ("export_hf", ["--checkpoint", "{src}", "--output", "{root}/hf_out"]),
    ("generate", ["--model", "{src}", "--max-new-tokens", "2"]),
    ("eval_loops", ["--model", "{src}", "--text", "{root}/t.txt", "--out-dir", "{root}/ev"]),
    ("consolidate", ["{src}", "{root}/out.safetensors"]),
])
@pytest.mark.parametrize("source", ["plain", "model_states", "zero3_optim"])
def test_the_tools_refuse_a_planted_pickle(planted, capsys, tool, argv, source):
    (planted["root"] / "t.txt").write_text("some text " * 20)
    argv = [a.format(src=planted[source], root=planted["root"]) for a in argv]
    _tool_refused(planted, capsys, tool, argv, "posix.mkdir" if os.name == "posix" else "mkdir")
    assert not (planted["root"] / "out.safetensors").exists() and not (planted["root"] / "hf_out").exists()


def test_resuming_a_downloaded_run_refuses_a_planted_rng_file(planted):
    """The resume path: the folder is checked before DeepSpeed's engine (weights_only=False inside) sees it."""
    from megaloop.checkpoint.engine import load_training

    class Engine:
        def load_checkpoint(self, *a, **k):
            raise AssertionError("DeepSpeed was handed a folder holding a planted pickle")

    tag = planted["rng"] / "checkpoints" / "step_00000001"
    _refused(planted, lambda: load_training(Engine(), tag, 0), "rng_rank00000.pt", "posix.mkdir")
    err = _refused(planted, lambda: load_model(planted["model_states"]), "mp_rank_00_model_states.pt")
    assert isinstance(err, CheckpointError)


def test_megaloop_files_still_load_safetensors_and_pt(tmp_path):
    """Both plain forms round-trip (a tied head is stored once in safetensors); old RNG files (numpy arrays)
    load under weights_only."""
    import random

    import numpy as np

    from megaloop.checkpoint import safe_load
    from megaloop.checkpoint.engine import rng_state, set_rng_state

    cfg = tiny_config("plain")
    model = perturbed_model(cfg)
    for name in ("model.safetensors", "model.pt"):
        f = save_plain_checkpoint(model, cfg, tmp_path / name)
        loaded, lcfg = load_model(f)
        assert lcfg.to_dict() == cfg.to_dict()
        assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())
    old = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    torch.save(old, tmp_path / "old_rng.pt")
    torch.save(rng_state(), tmp_path / "new_rng.pt")
    assert safe_load.unsafe_globals(tmp_path / "new_rng.pt") == []  # no numpy objects in what megaloop writes now
    draws = []
    for f in ("old_rng.pt", "new_rng.pt"):
        set_rng_state(safe_load.load(tmp_path / f))
        draws.append((random.random(), float(np.random.rand()), float(torch.rand(1))))
    assert draws[0] == draws[1]
    from safetensors.torch import save_file
    (tmp_path / "bare").mkdir()
    save_file({"w": torch.ones(2)}, str(tmp_path / "bare" / "model.safetensors"))
    with pytest.raises(CheckpointError, match="no config"):
        load_model(tmp_path / "bare" / "model.safetensors")
