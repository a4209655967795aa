"""A run's output folder: what a resume applies or refuses, one run at a time, and a clean stop on SIGTERM.

- Resume applies the schedule of the config given now (train.lr 1e-3 -> 1e-2 and more steps: steps 4-6
  run at 1e-2; before, the checkpoint's LR multiplier kept 1e-3 while config.yaml said 1e-2) and keeps
  each resume's config as config.<step>.yaml.
- It refuses a change it cannot apply (train.seed) with one line naming the field and the override flag,
  leaves config.yaml as it was, and accepts it with --override-resume-config. It refuses another corpus
  behind the same data.data_path (the dataset fingerprint saved in the checkpoint differs), and train.steps
  below the checkpoint's step, naming both.
- A second run in the same folder is refused while the first holds it; the lock record is empty after a
  clean end. SIGTERM to a single rank saves a checkpoint within two steps and exits 0.
"""
import os
import signal
import subprocess
import time

import yaml

from test_train_support import (PYTHON, REPO, free_port, make_byte_dataset, metrics, rank_env, run_ranks,
                                tiny_config, train_rows, write_config)


def _cfg(tmp_path, data, name, **train):
    t = {"steps": 3, "log_interval": 1, "lr": 1e-3, "lr_schedule": "constant", "warmup_steps": 0}
    t.update(train)
    return write_config(str(tmp_path / f"{name}.yaml"), tiny_config(data, str(tmp_path / "run"), train=t))


def test_resume_applies_the_new_schedule_and_refuses_what_it_cannot_apply(tmp_path):
    data = make_byte_dataset(str(tmp_path / "corpus"), max_bytes=100_000)
    run = str(tmp_path / "run")
    (rc, out), = run_ranks(1, ["--config", _cfg(tmp_path, data, "a")])
    assert rc == 0, out[-3000:]
    (rc, out), = run_ranks(1, ["--config", _cfg(tmp_path, data, "b", lr=1e-2, steps=6)])
    assert rc == 0, out[-3000:]
    assert "applied: train.lr: 0.001 -> 0.01; train.steps: 3 -> 6" in out
    lrs = {s: r["lr"] for s, r in train_rows(run).items()}
    assert lrs == {1: 1e-3, 2: 1e-3, 3: 1e-3, 4: 1e-2, 5: 1e-2, 6: 1e-2}
    assert yaml.safe_load(open(os.path.join(run, "config.3.yaml")))["train"]["lr"] == 1e-2
    before = open(os.path.join(run, "config.yaml")).read()
    # Another corpus behind the same data.data_path (the checkpoint's dataset fingerprint differs): refused.
    make_byte_dataset(data, max_bytes=60_000)
    (rc, out), = run_ranks(1, ["--config", _cfg(tmp_path, data, "b2", lr=1e-2, steps=8)])
    line = [ln for ln in out.splitlines() if "not the one the checkpoint was trained on" in ln]
    assert rc == 2 and line and data in line[0] and "documents" in line[0] and "--override-resume-config" in line[0]
    make_byte_dataset(data, max_bytes=100_000)  # the original corpus again (same bytes: the same fingerprint)
    (rc, out), = run_ranks(1, ["--config", _cfg(tmp_path, data, "c", lr=1e-2, steps=8, seed=5)])
    assert rc == 2
    line = [ln for ln in out.splitlines() if "train.seed" in ln]
    assert line and "--override-resume-config" in line[0] and "1234 in the checkpoint, 5 now" in line[0]
    assert open(os.path.join(run, "config.yaml")).read() == before  # nothing overwritten by a refused resume
    (rc, out), = run_ranks(1, ["--config", _cfg(tmp_path, data, "c", lr=1e-2, steps=8, seed=5),
                               "--override-resume-config"])
    assert rc == 0 and "(accepted by --override-resume-config)" in out
    assert max(train_rows(run)) == 8 and os.path.isfile(os.path.join(run, "config.6.yaml"))
    # train.steps below the checkpoint's step: one line saying so (was: "the run has used up its dataset")
    (rc, out), = run_ranks(1, ["--config", _cfg(tmp_path, data, "d", lr=1e-2, steps=5, seed=5)])
    assert rc == 2 and "Traceback" not in out, out[-3000:]
    assert "error: train.steps=5 is below the step of the checkpoint this run resumes" in out and "step 8)" in out


def test_one_run_per_output_folder_and_a_clean_stop_on_sigterm(tmp_path):
    data = make_byte_dataset(str(tmp_path / "corpus"), max_bytes=100_000)
    run = str(tmp_path / "run")
    long_cfg = _cfg(tmp_path, data, "long", steps=100_000, log_interval=1000)
    first = subprocess.Popen([PYTHON, os.path.join(REPO, "pretrain_looped.py"), "--config", long_cfg], cwd=REPO,
                             env=rank_env(0, 1, free_port()), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True)
    try:
        lock = os.path.join(run, ".megaloop.lock")
        deadline = time.time() + 120
        while time.time() < deadline and not (os.path.exists(lock) and os.path.getsize(lock) > 0):
            time.sleep(0.5)
        time.sleep(3)  # training steps under way
        (rc, out), = run_ranks(1, ["--config", _cfg(tmp_path, data, "second")])
        assert rc == 2 and f"output folder {run} is in use by another run (pid {first.pid}" in out, out[-2000:]
        first.send_signal(signal.SIGTERM)
        out, _ = first.communicate(timeout=120)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 0, out[-3000:]
    assert "stopped (SIGTERM) at step" in out
    step = max(r["step"] for r in metrics(run) if "loss" in r)
    assert open(os.path.join(run, "checkpoints", "latest")).read().strip() == f"step_{step:08d}"
    assert os.path.getsize(os.path.join(run, ".megaloop.lock")) == 0  # released
