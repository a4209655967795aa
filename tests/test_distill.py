"""train.distill (issue 15 item 3): a frozen teacher beside the student, per-loop KL during the warm-up, then the
final loop's KL (+ CE). References: torch's own KL (F.kl_div) and gradients for the loss; the one-process run for
TP 2; a straight run for a resumed one; the teacher's own weights for train.trainable=converted."""
import math
import os

import pytest
import torch
import torch.nn.functional as F

from test_train_support import assert_ok, make_byte_dataset, metrics, run_ranks, tiny_config, train_rows, write_config

from megaloop.checkpoint import load_model
from megaloop.config import ConfigError, config_from_dict
from megaloop.training.distill import distill_kl

MODEL = {"n_loop": 2, "loops": 2, "gdn_chunk_size": 16}


def _reference_kl(s, t, labels, T):
    kl = F.kl_div(F.log_softmax(s / T, -1), F.log_softmax(t / T, -1), log_target=True, reduction="none").sum(-1)
    mask = labels >= 0
    return T * T * (kl * mask).sum() / mask.sum()


@pytest.mark.parametrize("T", [1.0, 2.0, 0.5])
def test_kl_and_its_gradient_match_torch(T):
    g = torch.Generator().manual_seed(0)
    s = torch.randn(2, 5, 11, generator=g, requires_grad=True)
    t = 3 * torch.randn(2, 5, 11, generator=g)
    labels = torch.randint(0, 11, (2, 5), generator=g)
    labels[0, :2] = -1
    got = distill_kl(s, t, labels, T)
    ref = _reference_kl(s, t, labels, T)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    (gg,) = torch.autograd.grad(got, s)
    (gr,) = torch.autograd.grad(ref, s)
    torch.testing.assert_close(gg, gr, rtol=1e-5, atol=1e-7)
    assert not gg[0, :2].any()  # ignored positions get no gradient
    assert float(distill_kl(t.clone(), t, labels, T)) == pytest.approx(0.0, abs=1e-5)


def test_bad_distill_configs_are_refused():
    base = {"data": {"seq_len": 32}, "model": {"max_seq_len": 32}}
    with pytest.raises(ConfigError, match="pipeline_parallel"):
        config_from_dict({**base, "train": {"distill": {"teacher": "x"}}, "parallel": {"pipeline_parallel": 2}})
    with pytest.raises(ConfigError, match="train.distill.schedule"):
        config_from_dict({**base, "train": {"distill": {"teacher": "x", "schedule": "kl"}}})
    with pytest.raises(ConfigError, match="train.trainable='converted'"):
        config_from_dict({**base, "train": {"trainable": "converted", "distill": {"teacher": "x"}}})
    with pytest.raises(ConfigError, match="loop.granularity"):
        config_from_dict({**base, "train": {"distill": {"teacher": "x"}}, "loop": {"granularity": "sequence"}})
    with pytest.raises(ConfigError, match="train.stage"):
        config_from_dict({**base, "train": {"distill": {"teacher": "x"}, "stage": "exit_gate"},
                          "model": {"max_seq_len": 32, "exit_gate": True}})
    with pytest.raises(ConfigError, match="train.distill.temperature"):
        config_from_dict({**base, "train": {"distill": {"teacher": "x", "temperature": 0}}})


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A softmax-attention looped model trained for 300 steps on the byte corpus (the e2e check's teacher)."""
    tmp = tmp_path_factory.mktemp("distill")
    data = make_byte_dataset(str(tmp / "data"))
    out = str(tmp / "teacher")
    cfg = tiny_config(data, out, model=MODEL, train={"steps": 300, "log_interval": 100, "warmup_steps": 20})
    assert_ok(run_ranks(1, ["--config", write_config(str(tmp / "teacher.yaml"), cfg)], timeout=200))
    return tmp, data, out


def _student(data, out, teacher, steps, **train):
    return tiny_config(data, out, model={**MODEL, "mixer": "gdn,attn"},
                       init={"from": teacher, "convert_mixers": "gdn,attn"},
                       train={"steps": steps, "log_interval": 1, "lr": 3e-3, "warmup_steps": 0, "lr_schedule": "constant",
                              "distill": {"teacher": teacher, "warmup_steps": 4, "temperature": 2.0,
                                          "ce_weight": 0.5},
                              **train})


def test_resume_is_exact_and_trainable_converted_holds_the_rest(teacher):
    tmp, data, src = teacher
    straight = str(tmp / "straight")
    cfg = _student(data, straight, src, 6, trainable="converted")
    assert_ok(run_ranks(1, ["--config", write_config(str(tmp / "s.yaml"), cfg)], timeout=150))
    split = str(tmp / "split")
    cfg3 = _student(data, split, src, 3, trainable="converted")
    assert_ok(run_ranks(1, ["--config", write_config(str(tmp / "a.yaml"), cfg3)], timeout=150))
    cfg6 = _student(data, split, src, 6, trainable="converted")
    res = run_ranks(1, ["--config", write_config(str(tmp / "b.yaml"), cfg6)], timeout=150)
    assert_ok(res)
    assert "resumed from" in res[0][1]
    a, b = train_rows(straight), train_rows(split)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5, 6]
    for step in a:
        assert a[step]["loss"] == b[step]["loss"], (step, a[step]["loss"], b[step]["loss"])  # bit-identical
        assert a[step]["kl"] == b[step]["kl"]
    # per-loop KLs logged during the warm-up (R = 2), not after; the loss there is their mean
    assert all(len(a[s]["kl_per_loop"]) == 2 for s in (1, 2, 3, 4)) and "kl_per_loop" not in a[5]
    assert math.isclose(a[1]["loss"], sum(a[1]["kl_per_loop"]) / 2, rel_tol=1e-6)
    assert math.isclose(a[1]["kl"], a[1]["kl_per_loop"][-1], rel_tol=1e-6)
    # the teacher is not in the student's checkpoint; its path is in the config saved with it
    ckpt = os.path.join(split, "checkpoints", "step_00000003")
    sd_student, cfg_student = load_model(ckpt)
    assert cfg_student.train.distill.teacher == src
    assert not any("teacher" in k for k in sd_student.state_dict())
    # train.trainable=converted: after 3 warm-up steps only layer 0's (converted) mixer changed
    sd_teacher = load_model(src)[0].state_dict()
    changed = {k for k, v in sd_student.state_dict().items()
               if k in sd_teacher and v.shape == sd_teacher[k].shape and not torch.equal(v, sd_teacher[k])}
    assert changed and all(k.startswith("block.layers.0.mixer.") for k in changed), sorted(changed)[:5]
    sd6 = load_model(os.path.join(straight, "checkpoints", "step_00000006"))[0].state_dict()
    assert not torch.equal(sd6["block.layers.1.mlp.w1.weight"], sd_teacher["block.layers.1.mlp.w1.weight"])  # everything trains after the warm-up


def test_tp2_matches_one_process(teacher):
    tmp, data, src = teacher
    one = str(tmp / "straight")  # (the straight run of the test above: 1 rank, same config)
    if not os.path.exists(os.path.join(one, "metrics.jsonl")):
        cfg = _student(data, one, src, 6, trainable="converted")
        assert_ok(run_ranks(1, ["--config", write_config(str(tmp / "s.yaml"), cfg)], timeout=150))
    out = str(tmp / "tp2")
    cfg = _student(data, out, src, 5, trainable="converted")
    cfg["parallel"] = {"tensor_parallel": 2}
    assert_ok(run_ranks(2, ["--config", write_config(str(tmp / "tp2.yaml"), cfg)], timeout=150))
    a, b = train_rows(one), train_rows(out)
    for step in range(1, 6):  # both phases: per-loop KL (steps 1-4) and final KL + CE (step 5)
        assert math.isclose(a[step]["loss"], b[step]["loss"], rel_tol=2e-4), (step, a[step]["loss"], b[step]["loss"])


def test_e2e_distilled_student_kl_to_teacher_falls(teacher):
    """Issue 15's end-to-end check at test size: the 300-step attention teacher, converted to a GDN hybrid,
    distilled for 100 steps; the validation KL to the teacher falls."""
    tmp, data, src = teacher
    out = str(tmp / "e2e")
    cfg = _student(data, out, src, 100, log_interval=50, eval_interval=10, eval_iters=4, lr=1e-3)
    cfg["train"]["distill"].update({"warmup_steps": 30, "temperature": 1.0, "ce_weight": 0.0})
    assert_ok(run_ranks(1, ["--config", write_config(str(tmp / "e2e.yaml"), cfg)], timeout=150))
    kls = [row["kl_to_teacher"] for row in metrics(out) if "kl_to_teacher" in row]
    print("validation KL to the teacher every 10 steps:", [round(k, 4) for k in kls])
    assert len(kls) == 10 and kls[-1] < 0.5 * kls[0], kls
