"""The real `deepspeed` launcher, end to end (few invocations: each costs ~10-15 s of start-up here).

1. Two "nodes" on the loopback address: two launcher invocations with one hostfile (two host aliases,
   slots=1 each), --no_ssh, --node_rank 0/1, --master_addr 127.0.0.1, one port -> a 2-stage pipeline
   across the two "nodes" trains.
2. The demo config through the launcher (2 local ranks, PP 2): the loss falls; SIGTERM to the `deepspeed`
   runner alone makes the ranks save a complete checkpoint and exit cleanly (the launcher watchdog).
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from test_train_support import REPO, free_port, make_byte_dataset, metrics, rank_env, tiny_config, write_config

DEEPSPEED = os.path.join(os.path.dirname(sys.executable), "deepspeed")

pytestmark = pytest.mark.skipif(not os.path.exists(DEEPSPEED), reason="deepspeed launcher not installed")


def launcher_env():
    env = rank_env(0, 1, 0)
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    # the launcher starts `python` from PATH for the ranks: make it the venv's
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    return env


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_byte_dataset(str(tmp_path_factory.mktemp("launch") / "corpus"))


def _wait(procs, timeout):
    deadline = time.time() + timeout
    outs = []
    for p in procs:
        try:
            out, _ = p.communicate(timeout=max(1.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            for q in procs:
                try:
                    os.killpg(q.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            out, _ = p.communicate()
            outs.append((None, out))
            continue
        outs.append((p.returncode, out))
    return outs


def test_two_node_loopback_launch_trains(tmp_path, data):
    out_dir = str(tmp_path / "run")
    cfg = tiny_config(data, out_dir, train={"steps": 6, "log_interval": 3, "save_interval": 3, "grad_accum_steps": 2},
                      parallel={"pipeline_parallel": 2, "zero_stage": 1})
    cfg_path = write_config(str(tmp_path / "c.yaml"), cfg)
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=1\n127.0.0.1 slots=1\n")
    port = str(free_port())
    procs = []
    for node in (0, 1):
        cmd = [DEEPSPEED, "--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(node),
               "--master_addr", "127.0.0.1", "--master_port", port,
               "pretrain_looped.py", "--config", cfg_path]
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=launcher_env(), stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True, start_new_session=True))
    results = _wait(procs, 240)
    for node, (rc, out) in enumerate(results):
        assert rc == 0, f"node {node} exited with {rc}:\n{out[-4000:]}"
    rows = [r for r in metrics(out_dir) if "loss" in r]
    assert [r["step"] for r in rows] == list(range(1, 7))
    assert "world 2: pp 2 x dp 1 x tp 1" in results[0][1] + results[1][1]
    assert os.path.isfile(os.path.join(out_dir, "checkpoints", "step_00000006", "megaloop_complete.json"))


def _ranks_gone(out_dir) -> bool:
    import psutil
    return not any(f"train.output_dir={out_dir}" in " ".join(p.info["cmdline"] or [])
                   for p in psutil.process_iter(["cmdline"]))


def test_demo_config_under_launcher_learns_and_stops_cleanly_when_the_runner_gets_sigterm(tmp_path, data):
    out_dir = str(tmp_path / "demo")
    cmd = [DEEPSPEED, "--num_gpus", "2", "--master_port", str(free_port()), "pretrain_looped.py",
           "--config", os.path.join(REPO, "yaml_configs", "demo_cpu.yaml"),
           f"data.data_path=[{data}]", "data.tokenizer_type=byte", "data.tokenizer_model=null",
           "model.vocab_size=258", "data.seq_len=32", "model.max_seq_len=32", "train.steps=2000",
           "train.warmup_steps=5", "train.log_interval=5", "train.eval_interval=0", "train.save_interval=0",
           "train.tensorboard=true", f"train.output_dir={out_dir}"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=launcher_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    mpath = os.path.join(out_dir, "metrics.jsonl")
    deadline = time.time() + 180
    try:
        while time.time() < deadline and proc.poll() is None:
            time.sleep(1)
            if os.path.exists(mpath) and len([r for r in metrics(out_dir) if "loss" in r]) >= 40:
                break
        assert proc.poll() is None, "the run ended early:\n" + proc.communicate()[0][-4000:]
        # SIGTERM to the `deepspeed` runner's pid only, as a scheduler that signals the job's main process
        # does. The single-node runner exits without forwarding it; the ranks' launcher watchdog sees
        # their launch.py lose its runner and stops them as if they had got SIGTERM themselves.
        os.kill(proc.pid, signal.SIGTERM)
        (rc, out), = _wait([proc], 90)  # (the output pipe closes when the last rank has exited)
        assert _ranks_gone(out_dir), "ranks still running after the runner got SIGTERM"
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert f"stopped (the deepspeed runner (pid {proc.pid}) exited)" in out, out[-4000:]
    rows = [r for r in metrics(out_dir) if "loss" in r]
    first, last = rows[0]["loss"], sum(r["loss"] for r in rows[-5:]) / 5
    assert last < first - 1.0, (first, last)  # clearly falling (bytes: ~5.5 -> < 4.5)
    steps = max(r["step"] for r in rows)
    latest = open(os.path.join(out_dir, "checkpoints", "latest")).read().strip()
    assert latest == f"step_{steps:08d}"
    assert os.path.isfile(os.path.join(out_dir, "checkpoints", latest, "megaloop_complete.json"))
    assert os.listdir(os.path.join(out_dir, "tensorboard"))
    assert os.path.isfile(os.path.join(out_dir, "config.yaml"))
