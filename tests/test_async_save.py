"""train.async_save (issue 22): checkpoints written in the background while training continues.

- one rank, in-process: a slowed writer (fault slow_save) leaves step 2's checkpoint incomplete while
  steps 3 and 4 train; it becomes complete (marker, `latest`) only later; the run trains exactly like
  the synchronous run (same losses bit for bit), saves the same training state, and a resume from the
  async-saved step 4 continues as the uninterrupted run, bit for bit;
- a process that dies during an async write (slowed, then killed before the marker) while training has
  gone on leaves the previous checkpoint as `latest`, and the half-written tag is never read;
- unit (a stand-in engine): the written file holds the save step's values though the weights change
  before the write; a failed background write is one line naming the intact previous checkpoint.
"""
import os

import pytest
import torch

from dist_utils import run_distributed
from test_train_support import make_byte_dataset, metrics, run_ranks, tiny_config, train_losses, write_config


def _runs(rank, world, paths):
    from megaloop.config import load_config
    from megaloop.training.faults import FaultPlan
    from megaloop.training.trainer import Trainer
    out = {}
    for name, path in paths.items():
        faults = FaultPlan(slow_save=(2, 1.0)) if name == "async" else None
        tr = Trainer(load_config(path), faults=faults)
        res = tr.run()
        out[name] = {"losses": res["losses"], "history": list(tr.saver.history)}
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("async")
    data = make_byte_dataset(str(root / "corpus"), max_bytes=60_000)
    train = {"steps": 6, "save_interval": 2, "log_interval": 1}
    paths = {}
    for name, extra in (("sync", {}), ("async", {"async_save": True})):
        paths[name] = write_config(str(root / f"{name}.yaml"),
                                   tiny_config(data, str(root / name), train={**train, **extra}))
    paths["resume_async"] = write_config(str(root / "resume_async.yaml"), tiny_config(  # async step 4, resumed
        data, str(root / "resume_async"),
        train={**train, "load": str(root / "async" / "checkpoints" / "step_00000004")}))
    (res,) = run_distributed(_runs, world_size=1, args=(paths,), timeout=400)
    return root, data, res


def test_async_save_writes_in_the_background_and_trains_like_sync(runs):
    from megaloop.checkpoint import complete_tags, resolve
    from megaloop.checkpoint.training_state import load_training_state
    root, _, res = runs
    hist = {h["step"]: h["complete_at"] for h in res["async"]["history"]}
    # step 2's write slept 1 s: steps 3 and 4 trained meanwhile; it became complete at step 4's save
    assert hist[2] is not None and hist[2] >= 3, hist
    assert hist[6] == 6  # the run's end waits for its last write
    ckpts = root / "async" / "checkpoints"
    assert [d.name for d in complete_tags(ckpts)] == ["step_00000002", "step_00000004", "step_00000006"]
    assert (ckpts / "latest").read_text().strip() == "step_00000006"
    assert res["async"]["losses"] == res["sync"]["losses"]  # bit for bit
    a = load_training_state(resolve(ckpts, 4))
    b = load_training_state(resolve(root / "sync" / "checkpoints", 4))
    for key in ("weights", "exp_avg", "exp_avg_sq"):
        x, y = getattr(a, key), getattr(b, key)
        assert set(x) == set(y) and all(torch.equal(x[n], y[n]) for n in x), key
    assert a.adam_step == b.adam_step == 4
    for name in ("rng_rank00000.pt",):
        assert (ckpts / "step_00000004" / name).read_bytes() == \
            (root / "sync" / "checkpoints" / "step_00000004" / name).read_bytes()
    # (so a resume from the sync step 4 resumes the same state) a resume from the async step 4 continues
    # exactly as the uninterrupted run, bit for bit
    full, ra = train_losses(str(root / "sync")), train_losses(str(root / "resume_async"))
    assert sorted(ra) == [5, 6]
    for s in (5, 6):
        assert ra[s] == full[s], s


def test_crash_during_async_write_leaves_the_previous_latest(runs, tmp_path):
    from megaloop.checkpoint import is_complete, resolve
    _, data, _ = runs
    out = str(tmp_path / "crash")
    cfg = write_config(str(tmp_path / "crash.yaml"), tiny_config(
        data, out, train={"steps": 8, "save_interval": 2, "log_interval": 1, "async_save": True}))
    # step 4's write sleeps 1.5 s (training goes on), then the process dies before the marker
    results = run_ranks(1, ["--config", cfg], timeout=200, env={"MEGALOOP_FAULT": "slow_save:4:1.5,die_in_save:4"})
    assert [rc for rc, _ in results] == [17], results[0][1][-3000:]
    ckpts = os.path.join(out, "checkpoints")
    assert open(os.path.join(ckpts, "latest")).read().strip() == "step_00000002"
    assert not is_complete(os.path.join(ckpts, "step_00000004"))
    assert str(resolve(out)).endswith("step_00000002")
    assert max(r["step"] for r in metrics(out) if "loss" in r) > 4  # training continued during the write


class _FakeEngine:
    """DeepSpeed's save_checkpoint as far as the saver sees it: state dicts handed to its checkpoint engine."""

    def __init__(self):
        from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine
        self.checkpoint_engine = TorchCheckpointEngine()
        self.w = torch.ones(4)

    def save_checkpoint(self, root, tag, client_state, save_latest):
        os.makedirs(os.path.join(root, tag), exist_ok=True)
        self.checkpoint_engine.save({"w": self.w, "client": client_state}, os.path.join(root, tag, "model.pt"))


def _saver(tmp_path):
    from types import SimpleNamespace
    from megaloop.checkpoint.async_save import CheckpointSaver
    cfg = SimpleNamespace(async_save=True, dist_timeout=60.0, keep_checkpoints=0)
    return CheckpointSaver(_FakeEngine(), str(tmp_path / "checkpoints"), 0, cfg, console=lambda s: None)


def test_async_write_holds_the_save_steps_values(tmp_path, monkeypatch):
    import threading
    from megaloop.checkpoint import engine as ckpt_engine
    finalized = []
    monkeypatch.setattr(ckpt_engine, "finalize_save", lambda root, step, consumed, rank, keep:
                        finalized.append((step, consumed)) or os.path.join(root, f"step_{step:08d}"))
    saver, go = _saver(tmp_path), threading.Event()
    assert saver.save(2, {"consumed_samples": 8}, slow_hook=lambda: go.wait(30)) is None  # not complete yet
    saver.engine.w.fill_(7.0)  # the next optimizer step changes the weights in place before the write
    go.set()
    assert saver.wait(3).endswith("step_00000002") and finalized == [(2, 8)]
    assert saver.history == [{"step": 2, "complete_at": 3}] and saver.last_good.endswith("step_00000002")
    saved = torch.load(tmp_path / "checkpoints" / "step_00000002" / "model.pt", weights_only=True)
    assert torch.equal(saved["w"], torch.ones(4))
    assert (tmp_path / "checkpoints" / "step_00000002" / "rng_rank00000.pt").is_file()


def test_async_write_failure_is_one_line_naming_the_intact_checkpoint(tmp_path, monkeypatch):
    import errno
    from megaloop.checkpoint import layout
    from megaloop.errors import OutputError, one_line
    prev = tmp_path / "checkpoints" / layout.tag_for(1)
    prev.mkdir(parents=True)
    layout.write_marker(prev, 1, 4)

    def full(*a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(torch, "save", full)  # (the writer thread's torch.save)
    saver = _saver(tmp_path)
    saver.save(2, {"consumed_samples": 8})
    with pytest.raises(OutputError) as info:
        saver.wait(3)
    text = one_line(info.value)
    assert text.startswith("no space left on device") and str(prev) in text and "intact" in text, text
    assert layout.resolve(tmp_path / "checkpoints") == prev and saver.pending is None
