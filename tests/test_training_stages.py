"""train.stage (issue 13 items 5 and 6): DeepSeek-V3.2's dense warm-up of the DSA indexers and Ouro's
stage-II exit-gate training, through the real trainer (pretrain_looped.py, DeepSpeed engine).

Each run starts from the seeded init and trains a few steps: the stage's own loss falls, the parameters
it trains move, and every other parameter is bit-identical to the init (the optimizer never held them).
The stage-II loss is checked against a direct transcription of Ouro's formula; the refusals are one line.
"""
import math
import os

import pytest
import torch

from megaloop.checkpoint import load_model
from megaloop.config import ConfigError, load_config
from megaloop.model import build_model
from megaloop.model.stage_losses import exit_gate_bce
from test_train_support import (make_byte_dataset, run_ranks, tiny_config, train_losses, train_rows,
                                write_config)

DSA_MODEL = {"mixer": "attn,dsa", "n_loop": 2, "init_std": 0.25,  # peaked attention: a KL to learn
             "dsa_topk": 4, "dsa_index_heads": 2, "dsa_index_dim": 8}
GATE_MODEL = {"exit_gate": True, "loops": 3}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_byte_dataset(str(tmp_path_factory.mktemp("stages") / "bytes"), max_bytes=60_000)


def _run(tmp_path, data, name, model, stage, world=1, parallel=None, loops=2, steps=8):
    out_dir = str(tmp_path / name)
    cfg = tiny_config(data, out_dir, model=model, loop={"sampling": "fixed", "mean": loops},
                      train={"stage": stage, "steps": steps, "lr": 1e-2, "min_lr": 1e-2, "warmup_steps": 0,
                             "lr_schedule": "constant", "log_interval": 4, "weight_decay": 0.0},
                      parallel=parallel or {})
    path = write_config(str(tmp_path / f"{name}.yaml"), cfg)
    results = run_ranks(world, ["--config", path], timeout=240)
    for rc, out in results:
        assert rc == 0, out[-3000:]
    rows = train_rows(out_dir).values()
    assert rows and all(r["stage"] == stage and r["stage_loss"] for r in rows)  # metrics.jsonl names the stage
    init_cfg = load_config(path)
    torch.manual_seed(init_cfg.train.seed)
    init = build_model(init_cfg).state_dict()
    trained, _ = load_model(os.path.join(out_dir, "checkpoints"))
    # the stage's loss on one fixed batch, with the initial and with the trained weights
    tokens = torch.randint(0, 256, (4, 33), generator=torch.Generator().manual_seed(9))
    fixed = [_stage_loss(init_cfg, sd, tokens, loops) for sd in (init, trained.state_dict())]
    return init, trained.state_dict(), train_losses(out_dir), results[0][1], fixed


def _stage_loss(cfg, state_dict, tokens, loops):
    from megaloop.training.stages import apply_train_stage
    model = build_model(cfg)
    model.load_state_dict(state_dict)
    apply_train_stage(model, cfg.train)
    with torch.no_grad():
        return float(model.eval()(tokens[:, :-1], labels=tokens[:, 1:], loops=loops).loss)


def _check(init, trained, trains):
    moved, frozen = [], []
    for name, p0 in init.items():
        same = torch.equal(p0, trained[name])
        (moved if trains(name) else frozen).append((name, same))
    assert moved and not any(same for _, same in moved), [n for n, s in moved if s]
    assert frozen and all(same for _, same in frozen), [n for n, s in frozen if not s]


def _falls(losses, fixed):
    assert fixed[1] < fixed[0], fixed  # on the same batch, trained < initial
    steps = sorted(losses)
    first, last = [losses[s] for s in steps[:2]], [losses[s] for s in steps[-2:]]
    assert all(math.isfinite(v) for v in losses.values())
    assert sum(last) < sum(first), losses


def _is_indexer(name):
    return any(k in name for k in ("wq_index", "wk_index", "k_index_norm", "w_index"))


def test_dsa_warmup_trains_only_the_indexers_on_their_kl(tmp_path, data):
    init, trained, losses, out, fixed = _run(tmp_path, data, "warmup", DSA_MODEL, "dsa_warmup",
                                      parallel={"zero_stage": 1})
    _check(init, trained, _is_indexer)
    _falls(losses, fixed)
    assert "dsa_warmup indexer_kl" in out and "train.stage dsa_warmup: training" in out


def test_dsa_warmup_under_tensor_parallelism(tmp_path, data):
    init, trained, losses, out, fixed = _run(tmp_path, data, "warmup_tp", DSA_MODEL, "dsa_warmup", world=2,
                                      parallel={"tensor_parallel": 2}, steps=4)
    _check(init, trained, _is_indexer)
    _falls(losses, fixed)


def test_exit_gate_stage_trains_only_the_gate(tmp_path, data):
    init, trained, losses, out, fixed = _run(tmp_path, data, "gate", GATE_MODEL, "exit_gate", loops=3)
    _check(init, trained, lambda n: n.startswith("exit_gate."))
    _falls(losses, fixed)
    assert "exit_gate exit_gate_bce" in out


def test_exit_gate_bce_is_ouros_formula():
    g = torch.Generator().manual_seed(0)
    R, B, T = 4, 2, 5
    z = torch.randn(R, B, T, generator=g)
    L = torch.rand(R, B, T, generator=g) * 0.03 + torch.linspace(0.1, 0.0, R)[:, None, None]
    labels = torch.randint(0, 9, (B, T), generator=g)
    labels[0, 0] = -1
    k, gamma = 50.0, 0.005
    total, count = 0.0, 0
    for t in range(1, R):
        for b in range(B):
            for i in range(T):
                if labels[b, i] < 0:
                    continue
                imp = max(0.0, float(L[t - 1, b, i] - L[t, b, i]))
                w = 1 / (1 + math.exp(-k * (imp - gamma)))
                lam = 1 / (1 + math.exp(-float(z[t, b, i])))
                total += -(w * math.log(1 - lam) + (1 - w) * math.log(lam))
                count += 1
    assert float(exit_gate_bce(z, L, labels, k, gamma)) == pytest.approx(total / count, rel=1e-5)


@pytest.mark.parametrize("overrides, match", [
    (["train.stage=dsa_warmup"], "has no 'dsa' layer"),
    (["train.stage=exit_gate"], "needs model.exit_gate=true"),
    (["train.stage=exit_gate", "model.exit_gate=true", "parallel.pipeline_parallel=2"], "pipeline_parallel=1"),
    (["train.stage=exit_gate", "model.exit_gate=true", "train.activation_checkpointing=loop"],
     "activation_checkpointing=none"),
    (["train.stage=warmup"], "train.stage"),
])
def test_stage_refusals(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, overrides)


def test_stage_may_not_change_on_resume():
    from megaloop.training.resume_policy import ResumeConfigError, check_resume_config
    a = load_config(None, ["model.exit_gate=true"])
    b = load_config(None, ["model.exit_gate=true", "train.stage=exit_gate", "train.exit_gate_margin=0.01"])
    with pytest.raises(ResumeConfigError, match="train.stage"):
        check_resume_config(a, b, "run")
    c = load_config(None, ["model.exit_gate=true", "train.stage=exit_gate"])
    assert check_resume_config(c, b, "run") == ["train.exit_gate_margin: 0.005 -> 0.01"]
