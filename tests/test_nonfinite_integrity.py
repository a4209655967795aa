"""Issue 21 (1, 3): a non-finite step never updates the weights, a checkpoint marked complete is finite and
intact, and a damaged checkpoint is refused (naming the file) or, on resume, skipped for the previous one.

Two one-rank training runs (tiny model, seconds each): `diverge` (lr=1e3, a checkpoint every step, two
kept) and `clean` (a checkpoint at steps 2 and 4, whose step-4 shard is then damaged in copies).
"""
import json
import math
import os
import shutil

import pytest
import torch

from test_train_support import make_byte_dataset, metrics, run_ranks, tiny_config, write_config

from megaloop import checkpoint as ckpt
from megaloop.checkpoint.integrity import verify_tag


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("nonfinite")
    data = make_byte_dataset(str(root / "data" / "corpus"), max_bytes=100_000)
    cache = {}

    def run(name, train, expect_rc=0, out_dir=None):
        if name not in cache:
            out_dir = out_dir or str(root / name)
            path = write_config(str(root / f"{name}.yaml"), tiny_config(data, out_dir, train=train))
            (rc, text), = run_ranks(1, ["--config", path], timeout=180)
            assert rc == expect_rc, text[-3000:]
            cache[name] = (out_dir, text, path)
        return cache[name]
    run.root = root
    return run


DIVERGE = {"lr": 1e3, "warmup_steps": 0, "save_interval": 1, "keep_checkpoints": 2, "steps": 8, "log_interval": 1,
           "max_consecutive_skips": 3}


def _finite(tag) -> bool:
    sd, _ = ckpt.load(tag)
    return all(torch.isfinite(v).all() for v in sd.values())


# ------------------------------------------------------------------------------------------------
# 1. Non-finite steps are skipped, never saved; too many in a row stop the run naming a good checkpoint

def test_diverging_run_skips_counts_stops_and_keeps_only_finite_checkpoints(runs):
    # lr=1e3: step 1 moves the weights far, step 2's loss is finite but its gradients are NaN.
    out, text, _ = runs("diverge", DIVERGE, expect_rc=3)
    rows = {r["step"]: r for r in metrics(out) if "loss" in r}
    assert [s for s, r in sorted(rows.items()) if r["skipped"]] == [2, 3, 4], text[-2000:]
    assert math.isfinite(rows[2]["loss"]) and not math.isfinite(rows[2]["grad_norm"])  # finite loss, NaN gradients
    assert "3 steps in a row skipped for non-finite gradients" in text and "step 4" in text
    named = text.split("last good checkpoint: ")[-1].split()[0]
    # The named checkpoint is complete, finite and intact; rotation (keep 2) left only finite ones.
    tags = ckpt.complete_tags(os.path.join(out, "checkpoints"))
    assert [t.name for t in tags] == ["step_00000002", "step_00000003"] and named == str(tags[-1])
    for tag in tags:
        assert _finite(tag) and verify_tag(tag) is None and ckpt.layout.marker(tag)["finite"] is True
    # Skipped steps left the weights as step 1 made them: the checkpoints of steps 1 (rotated out), 2, 3 agree.
    a, b = ckpt.load(tags[0])[0], ckpt.load(tags[1])[0]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_pipeline_stages_agree_on_the_skip(runs):
    """PP 2 under ZeRO 0 (megaloop's hook; each stage sees only its gradients, the norm is all-reduced over
    the stages): both ranks skip the same steps and stop together, naming the same good checkpoint."""
    out = str(runs.root / "diverge_pp2")
    _, _, cfg_path = runs("diverge", DIVERGE, expect_rc=3)
    (r0, t0), (r1, t1) = run_ranks(2, ["--config", cfg_path, f"train.output_dir={out}",
                                       "parallel.pipeline_parallel=2"], timeout=240)
    assert r0 == 3 and r1 == 3, (t0[-2000:], t1[-2000:])
    rows = {r["step"]: r for r in metrics(out) if "loss" in r}
    assert [s for s, r in sorted(rows.items()) if r["skipped"]] == [2, 3, 4]
    tags = ckpt.complete_tags(os.path.join(out, "checkpoints"))
    assert "last good checkpoint: " + str(tags[-1]) in t0 and all(_finite(t) for t in tags)


def test_save_refuses_non_finite_weights_and_writes_nothing(tmp_path):
    from megaloop.checkpoint.engine import NonFiniteState, save_training, weights_finite

    class Engine:
        module = torch.nn.Linear(4, 4)

        def save_checkpoint(self, *a, **k):
            raise AssertionError("must not be reached")

    assert weights_finite(Engine.module)
    with torch.no_grad():
        Engine.module.weight[1, 2] = float("inf")
    with pytest.raises(NonFiniteState, match="weights after step 7 are not finite"):
        save_training(Engine(), tmp_path, 7, {"consumed_samples": 1}, rank=0)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("fused", [True, False])
def test_skip_hook_leaves_weights_and_adam_state_untouched(fused):
    """The ZeRO-0 hook: fused AdamW skips on the device (found_inf, no host read), foreach drops the grads."""
    from types import SimpleNamespace

    from megaloop.training.nonfinite import SkipNonFinite
    lin = torch.nn.Linear(3, 3)
    opt = torch.optim.AdamW(lin.parameters(), lr=0.1, fused=fused, foreach=None if fused else True)
    clip = SimpleNamespace(last_norm=None)
    hook = SkipNonFinite(clip)
    opt.register_step_pre_hook(hook)
    for p in lin.parameters():
        p.grad = torch.ones_like(p)
    clip.last_norm = torch.tensor(1.0, dtype=torch.float64)
    opt.step()
    assert not bool(hook.take())
    before = {k: v.clone() for k, v in lin.state_dict().items()}
    moments = [opt.state[p]["exp_avg"].clone() for p in lin.parameters()]
    for p in lin.parameters():
        p.grad = torch.full_like(p, float("nan"))
    clip.last_norm = torch.tensor(float("nan"), dtype=torch.float64)
    opt.step()
    flag = hook.take()
    assert isinstance(flag, torch.Tensor) == fused and bool(flag)
    assert all(torch.equal(before[k], v) for k, v in lin.state_dict().items())
    assert all(torch.equal(m, opt.state[p]["exp_avg"]) for m, p in zip(moments, lin.parameters()))
    assert all(float(opt.state[p]["step"]) == 1 for p in lin.parameters())


def test_skip_ledger_counts_in_a_row_and_leaves_fp16_loss_scaling_alone():
    from megaloop.training.nonfinite import SkipLedger, TrainingError
    said = []
    ledger = SkipLedger(2, "fp16", said.append)
    row = lambda s, skipped, loss: {"step": s, "skipped": skipped, "loss": loss, "loss_scale": 2.0 ** 15}  # noqa: E731
    ledger.settle(row(1, True, 3.0), None)  # loss scaling at work: not counted
    ledger.settle(row(2, True, float("nan")), None)
    ledger.settle(row(3, False, 3.0), None)  # a good step resets the run of skips
    ledger.settle(row(4, True, float("inf")), "/ck/step_00000003")
    with pytest.raises(TrainingError, match=r"2 steps in a row .* step 5.*last good checkpoint: /ck/step_00000003"):
        ledger.settle(row(5, True, float("nan")), "/ck/step_00000003")
    assert ledger.total == 3 and "fp16 loss scaling" in said[0]
    with pytest.raises(TrainingError, match=r"non-finite loss \(nan\) at step 6"):  # not skipped: stop
        ledger.settle(row(6, False, float("nan")), None)


# ------------------------------------------------------------------------------------------------
# 3. Damaged checkpoints: refused by the tools naming the file; resume falls back with a note

def _damaged_copy(runs, name):
    out, _, cfg_path = runs("clean", {"steps": 4, "save_interval": 2})
    copy = str(runs.root / name)
    shutil.copytree(out, copy)
    shard = os.path.join(copy, "checkpoints", "step_00000004", "mp_rank_00_model_states.pt")
    size = os.path.getsize(shard)
    with open(shard, "r+b") as f:  # 4 KiB of tensor records zeroed in the middle of the shard
        f.seek((size // 2) // 4096 * 4096)
        f.write(b"\0" * 4096)
    return copy, shard, cfg_path


def test_damaged_shard_is_refused_by_consolidate_export_and_eval_naming_the_file(runs, capsys, tmp_path):
    from tools import consolidate, eval_loops, export_hf
    run, shard, _ = _damaged_copy(runs, "damaged_tools")
    text_file = tmp_path / "t.txt"
    text_file.write_text("hello world " * 50)
    for main, argv in [(consolidate.main, [run, str(tmp_path / "m.pt")]),
                       (export_hf.main, ["--checkpoint", run, "--output", str(tmp_path / "hf")]),
                       (eval_loops.main, ["--model", run, "--text", str(text_file), "--loops", "1",
                                          "--out-dir", str(tmp_path / "ev")])]:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.startswith("error: ") and shard in err and "does not match its checksum" in err, err
    assert not (tmp_path / "m.pt").exists() and not (tmp_path / "hf").exists()
    # The previous tag is intact and still readable by naming it; the check can be skipped.
    assert consolidate.main([run, "--step", "2"]) == 0
    assert consolidate.main([run, "--no-verify-checksums"]) == 0


def test_resume_skips_a_damaged_latest_for_the_previous_intact_tag(runs):
    run, shard, cfg_path = _damaged_copy(runs, "damaged_resume")
    (rc, text), = run_ranks(1, ["--config", cfg_path, f"train.output_dir={run}", "train.steps=5"], timeout=180)
    assert rc == 0, text[-3000:]
    assert f"skipped {os.path.dirname(shard)}" in text and shard in text, text[-3000:]
    assert "resumed from" in text and "step_00000002 at step 2" in text
    # A tag without checksums (saved before megaloop recorded them) still loads, with one note.
    tag = os.path.join(run, "checkpoints", "step_00000002")
    m = ckpt.layout.marker(tag)
    m.pop("checksums")
    with open(os.path.join(tag, ckpt.COMPLETE), "w") as f:
        json.dump(m, f)
    assert "no checksums" in verify_tag(tag) and verify_tag(tag) is None  # (said once)
    assert _finite(tag)


def _verify_on_ranks(rank, world, paths):
    """verified_by_rank0 of each path on this rank: (files this rank hashed, the verify its loader gets, the
    error message or None)."""
    from megaloop.checkpoint import integrity

    out = []
    real = integrity.file_digest
    try:
        for path in paths:
            hashed = []
            integrity.file_digest = lambda p: (hashed.append(p), real(p))[1]
            try:
                verify, error = integrity.verified_by_rank0(path, verify=True, rank=rank, world=world), None
            except integrity.CheckpointError as e:
                verify, error = None, str(e)
            out.append((len(hashed), verify, error))
    finally:
        integrity.file_digest = real
    return out


def test_a_checkpoint_every_rank_reads_is_hashed_on_rank_0_only_and_its_verdict_reaches_every_rank(tmp_path):
    """init.from and the distillation teacher are read whole by every rank: rank 0 alone re-hashes the tag
    (before: every rank did, world x the bytes) and a damaged tag is refused on every rank with rank 0's
    message; a path that is not a megaloop checkpoint has nothing to check; one rank verifies in its loader."""
    from dist_utils import run_distributed

    from megaloop.checkpoint.integrity import checksum_tag, verified_by_rank0
    from megaloop.checkpoint.layout import COMPLETE

    tag = tmp_path / "step_00000001"
    tag.mkdir()
    for i in range(3):
        (tag / f"mp_rank_0{i}_model_states.pt").write_bytes(os.urandom(4096))
    (tag / COMPLETE).write_text(json.dumps({"step": 1, "consumed_samples": 0, "finite": True,
                                            "checksums": checksum_tag(tag, 0, 1)}))
    damaged = tmp_path / "damaged" / "step_00000001"
    shutil.copytree(tag, damaged)
    shard = damaged / "mp_rank_01_model_states.pt"
    data = bytearray(shard.read_bytes())
    data[100] ^= 1
    shard.write_bytes(bytes(data))
    plain = tmp_path / "model.pt"
    plain.write_bytes(b"not a checkpoint folder")

    r0, r1 = run_distributed(_verify_on_ranks, world_size=2, args=([str(tag), str(damaged), str(plain)],),
                             timeout=120)
    assert r0[0] == (3, False, None) and r1[0] == (0, False, None)  # intact: hashed once, loaders skip it
    assert r1[1][0] == 0 and r0[1][2] == r1[1][2] and "mp_rank_01_model_states.pt" in r1[1][2]
    assert "does not match its checksum" in r1[1][2]
    assert r0[2] == r1[2] == (0, False, None)  # no checksums to check: the loader's own errors stand
    assert verified_by_rank0(str(tag), verify=True, rank=0, world=1) is True  # one rank: its loader checks
    assert verified_by_rank0(str(tag), verify=False, rank=0, world=2) is False  # (no collective: off)
