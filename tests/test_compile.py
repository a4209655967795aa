"""train.compile: every transformer layer torch.compile'd (inductor's CPU backend here), the loop not.

One small FLT model (prelude + 2 looped layers + coda; FLT's first loop has no query stream, so a
looped layer has two graphs) is shared by the tests: Dynamo caches graphs per code object and guards on
parameter shapes, not module identity, so later tests in this process reuse the first test's graphs.
Cost on CPU: about 20-40 s of compilation for the first test, then seconds (plus one more model with
dropout, and two single-rank trainer runs whose inductor kernels come from the on-disk cache).
"""
import glob
import os

import pytest
import torch

from megaloop.config import ConfigError, load_config
from megaloop.model import build_model
from megaloop.model.compile import apply_compile, compile_after, compile_layers, is_compiled

pytestmark = pytest.mark.filterwarnings("ignore")

MODEL = ["model.d_model=32", "model.n_heads=4", "model.n_kv_heads=2", "model.max_seq_len=32", "data.seq_len=32",
         "model.n_prelude=1", "model.n_loop=2", "model.n_coda=1", "model.arch=flt", "model.loops=3"]
STEPS_R = (3, 1, 2, 5, 4)  # R per optimizer step: the first compiles both FLT graphs, the rest must not


def _graphs() -> int:
    from torch._dynamo.utils import counters
    return counters["stats"]["unique_graphs"]


def _train(cfg, compiled: bool, ckpt: str = "none", rs=STEPS_R, seed=0):
    """Losses of a few AdamW steps, R changing every step, and the graphs compiled after step 1."""
    torch.manual_seed(seed)
    model = build_model(cfg)
    keys = list(model.state_dict())
    if compiled:
        assert compile_layers(model) == cfg.model.n_prelude + cfg.model.n_loop + cfg.model.n_coda
        assert is_compiled(model)
    assert list(model.state_dict()) == keys  # no `_orig_mod.` prefixes: checkpoints and export unchanged
    model.block.activation_checkpointing = ckpt
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(seed)
    losses, after_first = [], None
    for step, R in enumerate(rs):
        x = torch.randint(0, 258, (4, 33), generator=g)
        torch.manual_seed(100 + step)  # dropout
        loss = model(x[:, :-1], labels=x[:, 1:], loops=R).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
        if step == 0:
            after_first = _graphs()
    return losses, _graphs() - after_first


@pytest.fixture(scope="module")
def cfg():
    return load_config(None, MODEL)


def test_compiled_layers_match_eager_and_never_recompile_for_a_new_R(cfg):
    eager, _ = _train(cfg, False)
    before = _graphs()
    comp, new_graphs = _train(cfg, True)
    assert comp == pytest.approx(eager, rel=1e-5, abs=1e-6)
    assert new_graphs == 0, f"{new_graphs} graphs compiled after step 1 (R changed: {STEPS_R})"
    # prelude/coda (called without the loop's keywords) + looped layer without / with FLT's query stream
    assert _graphs() - before <= 3


@pytest.mark.parametrize("ckpt", ["loop", "layer"])
def test_compiled_layers_under_activation_checkpointing(cfg, ckpt):
    eager, _ = _train(cfg, False)
    before = _graphs()
    comp, _ = _train(cfg, True, ckpt=ckpt)
    assert comp == pytest.approx(eager, rel=1e-5, abs=1e-6)
    assert _graphs() == before  # the checkpoint's recompute calls the same compiled layers


def test_dropout_in_compiled_layers_replays_under_checkpointing():
    """Inductor draws dropout's seeds from the default generator when a graph runs: the checkpoint's RNG
    restore replays the masks, so per-loop / per-layer recompute gives exactly the losses without it."""
    # (no prelude / coda, recurrent loop: one more graph to compile, not three)
    cfg = load_config(None, MODEL + ["model.dropout=0.1", "model.n_prelude=0", "model.n_coda=0", "model.arch=recurrent"])
    ref, _ = _train(cfg, True, rs=(3, 2, 4))
    for ckpt in ("loop", "layer"):
        assert _train(cfg, True, ckpt=ckpt, rs=(3, 2, 4))[0] == ref
    other, _ = _train(cfg, True, rs=(3, 2, 4), seed=0)
    assert other == ref  # deterministic given the seed
    eager, _ = _train(cfg, False, rs=(3, 2, 4))
    assert eager == pytest.approx(ref, abs=5e-3)  # other masks than eager, same model


def test_config_and_hooks():
    cfg = load_config(None, MODEL)
    assert cfg.train.compile is False and cfg.train.compile_mode == "default"
    model = build_model(cfg)
    assert apply_compile(model, cfg) == 0 and not is_compiled(model)
    assert compile_after(None, cfg) is None  # compile off: the trainer's hook is unchanged
    with pytest.raises(ConfigError, match="train.compile_mode"):
        load_config(None, MODEL + ["train.compile=true", "train.compile_mode=reduce-overhead"])
    with pytest.raises(ConfigError, match="zero_stage=3"):
        load_config(None, MODEL + ["train.compile=true", "parallel.zero_stage=3"])
    on = load_config(None, MODEL + ["train.compile=true"])
    seen = []
    hook = compile_after(lambda lm: seen.append(is_compiled(lm)), on)
    hook(model)
    assert seen == [False] and is_compiled(model)  # after the TP hook, not before
    assert apply_compile(model, on) == 4  # idempotent


# ---------------------------------------------------------------------------------------------
# Through the real trainer (pretrain_looped.py, one rank), sampled R, a checkpoint saved.


def test_trainer_compile_matches_eager_and_checkpoint_keys_unchanged(tmp_path):
    from test_train_support import (assert_ok, make_byte_dataset, run_ranks, tiny_config, train_losses,
                                    write_config)
    from megaloop.checkpoint import load_deepspeed_checkpoint
    data = make_byte_dataset(str(tmp_path / "data" / "corpus"), max_bytes=100_000)
    model = {"d_model": 32, "n_heads": 4, "n_kv_heads": 2, "max_seq_len": 32, "n_prelude": 1, "n_loop": 2,
             "n_coda": 1, "arch": "flt", "injection": "none", "loops": 3}
    out = {}
    for compiled in (False, True):
        run_dir = str(tmp_path / f"compile_{compiled}")
        cfg = tiny_config(data, run_dir, model=model, loop={"sampling": "poisson", "mean": 3, "min": 1, "max": 5},
                          train={"steps": 6, "log_interval": 1, "save_interval": 6, "compile": compiled})
        results = run_ranks(1, ["--config", write_config(str(tmp_path / f"c{compiled}.yaml"), cfg)], timeout=240)
        assert_ok(results)
        assert ("torch.compile: 4 transformer layers" in results[0][1]) == compiled
        ckpt = glob.glob(os.path.join(run_dir, "checkpoints", "step_*", "mp_rank_00_model_states.pt"))
        assert len(ckpt) == 1
        keys = list(torch.load(ckpt[0], map_location="cpu", weights_only=False)["module"])
        sd, _ = load_deepspeed_checkpoint(run_dir)  # the export path reads it
        out[compiled] = (train_losses(run_dir), keys, sd)
    (l0, k0, sd0), (l1, k1, sd1) = out[False], out[True]
    assert k1 == k0 and not any("_orig_mod" in k for k in k1)
    assert sorted(l1) == sorted(l0) == list(range(1, 7))
    for s in l0:
        assert l1[s] == pytest.approx(l0[s], rel=1e-4), f"step {s}"
    for k in sd0:
        torch.testing.assert_close(sd1[k], sd0[k], atol=1e-4, rtol=1e-3)
