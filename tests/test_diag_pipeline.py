"""train.diag_interval under pipeline parallelism (megaloop/training/pipeline_diagnostics.py).

A tiny model (two looped layers, Parcae injection: three parameter groups) with a prelude layer and a
coda layer, split over 3 stages by the loop-weighted partition as
[embedding, embed_norm, prelude] | [loop] | [coda, final_norm, head]: the stage before the looped one
sends the injected signal on without gradients, the stage after it runs the loss and sends d loss / d x
back. The PP = 3 run logs the diagnostics of the PP = 1 run (same seed and config) at steps 2 and 4
only, and trains exactly like the same PP = 3 run without diagnostics. PP = 2 x TP = 2 (the prelude on
the looped stage, before the block; TP reductions; a random initial state drawn from the diagnostics'
seeded generator) gives the PP = 1 numbers too, and trains like PP = 1.
"""
import pytest

from dist_utils import run_distributed
from test_train_support import make_byte_dataset, metrics, tiny_config, write_config

from megaloop.config import load_config
from megaloop.parallel.stage_split import stage_plan

STEPS = 4
MODEL = {"n_prelude": 1, "n_coda": 1, "n_loop": 2, "injection": "parcae", "normalization": "inner",
         "n_kv_heads": 2}
RUNS = {  # name: (pipeline, tensor parallel, diag_interval, state_init)
    "pp1": (1, 1, 2, "embed"), "pp3": (3, 1, 2, "embed"), "pp3_off": (3, 1, 0, "embed"),
    "pp1_noise": (1, 1, 2, "noise"), "pp2_tp2_noise": (2, 2, 2, "noise")}


def _train(rank, world, cfg_path):
    from megaloop.training.trainer import Trainer
    return Trainer(load_config(cfg_path)).run()["losses"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("diag_pp")
    data = make_byte_dataset(str(root / "corpus"), max_bytes=60_000)
    out = {}
    for name, (pp, tp, interval, init) in RUNS.items():
        cfg = tiny_config(data, str(root / name), model={**MODEL, "state_init": init},
                          train={"steps": STEPS, "log_interval": 1, "diag_interval": interval},
                          parallel={"pipeline_parallel": pp, "tensor_parallel": tp})
        path = write_config(str(root / f"{name}.yaml"), cfg)
        losses = run_distributed(_train, world_size=pp * tp, args=(path,), timeout=240)[-1]
        out[name] = (losses, metrics(str(root / name)), load_config(path))
    return out


def _diag_rows(rows):
    return {r["step"]: r["diagnostics"] for r in rows if "diagnostics" in r}


def _assert_same(a, b, rel=1e-4, abs_=1e-6):
    assert a["groups"] == b["groups"] and a["loops"] == b["loops"]
    assert a["loop_map_spectral_norm"] == pytest.approx(b["loop_map_spectral_norm"], rel=rel)
    # A finite difference with eps = 1e-3 in float32: another summation order (TP's split matmuls) moves
    # it by ~1e-7 / 1e-3 relative.
    assert a["input_dependence"] == pytest.approx(b["input_dependence"], rel=10 * rel)
    for k in ("grad_norm", "grad_cosine"):
        for ra, rb in zip(a[k], b[k], strict=True):
            for va, vb in zip(ra, rb, strict=True):
                assert (va is None) == (vb is None), k
                if va is not None:
                    assert va == pytest.approx(vb, rel=rel, abs=abs_), (k, ra, rb)


def test_layouts_under_test(runs):
    cfg = runs["pp3"][2]
    assert stage_plan(cfg, 3) == [["embedding", "embed_norm", "prelude"], ["loop"], ["coda", "final_norm", "head"]]
    assert stage_plan(cfg, 2)[0][-2:] == ["prelude", "loop"] and stage_plan(cfg, 2)[1][-1] == "head"


@pytest.mark.parametrize("run,ref", [("pp3", "pp1"), ("pp2_tp2_noise", "pp1_noise")])
def test_pipeline_logs_the_single_stage_diagnostics_at_steps_2_and_4(runs, run, ref):
    want = _diag_rows(runs[ref][1])
    got = _diag_rows(runs[run][1])
    assert sorted(want) == [2, 4] and sorted(got) == [2, 4]
    for step in (2, 4):
        d = got[step]
        assert d["loops"] == 2 and d["groups"] == ["layer0", "layer1", "injection"]
        assert d["loop_map_spectral_norm"] > 0 and d["input_dependence"] > 0
        assert all(v > 0 for row in d["grad_norm"] for v in row)
        _assert_same(d, want[step])


def test_pipeline_diagnostics_do_not_change_training(runs):
    on, off = runs["pp3"][0], runs["pp3_off"][0]
    assert len(on) == STEPS and on == off  # bit-identical losses
    assert not _diag_rows(runs["pp3_off"][1])
    # the noise start: the diagnostics' draws come from their own generator, not the run's RNG
    assert runs["pp2_tp2_noise"][0] == pytest.approx(runs["pp1_noise"][0], rel=1e-6)
