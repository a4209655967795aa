"""Running a job: trackers (W&B offline, MLflow file store, read back), the console's ETA and tokens seen,
train.time_limit (exit 75, checkpoint, resume), train.profile, srun's environment, the launcher watchdog
under torchrun, torchrun with 2 ranks, scripts/slurm/pretrain.sbatch (with stand-ins for srun / scontrol)."""
import glob
import json
import os
import signal
import stat
import struct
import subprocess
import sys
import textwrap
import time

import pytest

from test_train_support import REPO, free_port, make_byte_dataset, metrics, rank_env, tiny_config, write_config

from megaloop.config import ConfigError, load_config
from megaloop.training.cli import main
from megaloop.training.distributed import _tasks_on_node, fill_from_slurm, first_host
from megaloop.training.stopping import LauncherWatchdog, RunStops, StopFlag, launcher_kind
from megaloop.training.time_limit import EXIT_TIME_LIMIT, Deadline


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_byte_dataset(str(tmp_path_factory.mktemp("ops") / "corpus"), max_bytes=100_000)


def _config(tmp_path, data, out, **train):
    cfg = tiny_config(data, str(tmp_path / out), train={"steps": 4, "log_interval": 2, **train})
    return write_config(str(tmp_path / f"{out}.yaml"), cfg)


def _wandb_records(path):
    """The records of an offline W&B run file (.wandb: LevelDB-log framing of protobuf Records)."""
    from wandb.proto import wandb_internal_pb2 as pb
    data = open(path, "rb").read()
    assert data[:4] == b":W&B"
    pos, buf = 7, b""
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:
            pos += left
            continue
        _, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and n == 0:
            pos += left
            continue
        buf += data[pos + 7:pos + 7 + n]
        pos += 7 + n
        if kind in (1, 4):  # a full record, or the last piece of one
            rec = pb.Record()
            rec.ParseFromString(buf)
            buf = b""
            yield rec


def test_wandb_offline_and_mlflow_get_the_same_scalars_config_and_layout_and_a_resume_continues_them(
        tmp_path, data, monkeypatch, capsys):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_CONSOLE", "off")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_DIR", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    path = _config(tmp_path, data, "run", loggers=["jsonl", "wandb", "mlflow"])
    out = str(tmp_path / "run")
    assert main(["--config", path]) == 0
    console = capsys.readouterr().out
    step2 = next(line for line in console.splitlines() if "step 2/4" in line)
    assert "tokens 256" in step2 and "ETA " in step2, step2  # 2 steps x 4 sequences x 32 tokens
    losses = {r["step"]: r["loss"] for r in metrics(out) if "loss" in r}
    assert not os.path.exists(os.path.join(out, "tensorboard")) and not os.path.exists(os.path.join(out, "profile"))

    (wandb_file,) = glob.glob(os.path.join(out, "wandb", "offline-run-*", "run-*.wandb"))
    history, config = {}, {}
    for rec in _wandb_records(wandb_file):
        kind = rec.WhichOneof("record_type")
        if kind == "history":
            row = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item}
            history[row.get("_step", rec.history.step.num)] = row
        elif kind in ("run", "config"):
            items = rec.run.config.update if kind == "run" else rec.config.update
            config.update({i.key: json.loads(i.value_json) for i in items})
    assert sorted(history) == [2, 4]
    assert history[4]["train/loss"] == pytest.approx(losses[4])
    assert len([k for k in history[2] if k.startswith("loops/residual_norm/loop")]) == 2  # per-loop names kept
    assert config["model"]["d_model"] == 32 and config["run"]["layout"]["world"] == 1
    from megaloop.training.trackers import git_commit
    assert config["run"].get("git_commit") == git_commit().get("git_commit")  # (40 hex digits in a git checkout)

    from mlflow.tracking import MlflowClient
    ids = json.load(open(os.path.join(out, "trackers.json")))
    client = MlflowClient(tracking_uri="file:" + os.path.join(out, "mlruns"))
    run = client.get_run(ids["mlflow_run_id"])
    assert run.data.params["model.d_model"] == "32" and run.data.tags["layout.world"] == "1"
    assert run.data.tags.get("git_commit") == config["run"].get("git_commit")
    hist = client.get_metric_history(run.info.run_id, "train/loss")
    assert {m.step: m.value for m in hist} == pytest.approx({2: losses[2], 4: losses[4]})
    assert client.get_metric_history(run.info.run_id, "loops/residual_norm/loop02")

    # A resume (2 more steps) logs into the same MLflow run and W&B run id.
    assert main(["--config", path, "train.steps=6"]) == 0
    assert json.load(open(os.path.join(out, "trackers.json"))) == ids
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "train/loss")) == [2, 4, 6]


def test_time_limit_saves_a_checkpoint_exits_75_and_the_requeued_run_resumes(tmp_path, data, capsys):
    # 0.001 min after this (long-running) process started: past already, so the first steps ask to stop.
    path = _config(tmp_path, data, "tl", steps=100, log_interval=50, time_limit="0.001", time_limit_margin=0)
    out = str(tmp_path / "tl")
    assert main(["--config", path]) == EXIT_TIME_LIMIT
    console = capsys.readouterr().out
    status = json.load(open(os.path.join(out, "run_status.json")))
    assert status["status"] == "time_limit" and status["exit_code"] == 75, status
    step = status["step"]
    assert 1 <= step <= 3  # the request is agreed StopAgreement.LAG steps later at most
    latest = open(os.path.join(out, "checkpoints", "latest")).read().strip()
    assert latest == f"step_{step:08d}"
    assert os.path.isfile(os.path.join(out, "checkpoints", latest, "megaloop_complete.json"))
    assert f"stopped (time limit: train.time_limit=0.001 min" in console
    # the requeued job: the same command without the limit resumes and finishes
    assert main(["--config", path, "train.time_limit=null", f"train.steps={step + 2}"]) == 0
    assert f"resumed from {os.path.join(out, 'checkpoints', latest)}" in capsys.readouterr().out
    assert json.load(open(os.path.join(out, "run_status.json")))["status"] == "finished"


def test_time_limit_from_slurm_and_the_refused_values(tmp_path, monkeypatch):
    cfg = load_config(None, ["train.time_limit=slurm", "train.time_limit_margin=10"])
    assert Deadline.from_config(cfg.train, {"SLURM_JOB_END_TIME": "100000"}).at == 100000 - 600
    with pytest.raises(ConfigError, match="SLURM_JOB_END_TIME"):
        Deadline.from_config(cfg.train, {})
    assert Deadline.from_config(load_config(None, []).train) is None
    for bad, words in [("train.time_limit=soon", "train.time_limit='soon'"), ("train.time_limit=-5", "minutes > 0"),
                       ("train.loggers=[tensorboard,neptune]", "'neptune' is not one of"),
                       ("train.loggers=[jsonl,jsonl]", "twice"), ("train.wandb.mode=cloud", "train.wandb.mode"),
                       ("train.profile.ranks=[]", "train.profile.ranks")]:
        with pytest.raises(ConfigError, match=words.replace("[", r"\[")):
            load_config(None, [bad])
    from megaloop.training.trackers import build_trackers
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    with pytest.raises(ConfigError, match="train.loggers: mlflow could not start .*bogus"):
        build_trackers(load_config(None, ["train.loggers=[mlflow]", "train.mlflow.tracking_uri=bogus://x"]).train,
                       str(tmp_path))
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ConfigError, match=r"wandb package is not installed: pip install -e '.\[track\]'"):
        load_config(None, ["train.loggers=[jsonl,wandb]"])


def test_profile_writes_a_chrome_trace_of_the_chosen_steps(tmp_path, data):
    path = _config(tmp_path, data, "prof", profile={"start": 2, "steps": 2})
    assert main(["--config", path]) == 0
    (trace,) = glob.glob(str(tmp_path / "prof" / "profile" / "rank0.*.pt.trace.json"))
    names = {e.get("name") for e in json.load(open(trace))["traceEvents"]}
    assert {"step 2", "step 3"} <= names and not {"step 1", "step 4"} & names
    from megaloop.training.profiling import StepProfiler
    pcfg = load_config(None, ["train.profile.steps=2"]).train.profile
    assert type(StepProfiler.from_config(pcfg, str(tmp_path), 1, print)).__name__ == "_Off"  # rank 1: not listed


def test_srun_tasks_get_the_launcher_environment_from_slurm_variables():
    assert first_host("gpu[003-005,9],cpu1") == "gpu003"
    assert first_host("rack[1-2]-node[07-08]") == "rack1-node07"
    assert first_host("login1") == "login1"
    assert [_tasks_on_node("4(x2),3", n) for n in range(3)] == [4, 4, 3]
    env = {"SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_NODEID": "1", "SLURM_STEP_NUM_TASKS": "8",
           "SLURM_STEP_TASKS_PER_NODE": "4(x2)", "SLURM_STEP_NODELIST": "gpu[010-011]", "SLURM_JOB_ID": "4242"}
    assert fill_from_slurm(env)
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"], env["LOCAL_SIZE"]) == ("5", "8", "1", "4")
    assert (env["MASTER_ADDR"], env["MASTER_PORT"]) == ("gpu010", str(20000 + 4242))
    launched = {"RANK": "3", "SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "2"}  # torchrun / deepspeed under srun
    assert not fill_from_slurm(launched) and launched["RANK"] == "3"
    assert not fill_from_slurm({"SLURM_PROCID": "0", "SLURM_JOB_ID": "1"})  # the batch script itself


def test_launcher_watchdog_knows_torchrun_and_srun_and_notices_a_dead_parent():
    assert launcher_kind("/usr/bin/python -m deepspeed.launcher.launch --world_info=x") == "deepspeed"
    assert launcher_kind("/venv/bin/python /venv/bin/torchrun --nproc-per-node 8 pretrain_looped.py") == "torchrun"
    assert launcher_kind("python -m torch.distributed.run --nnodes 2 pretrain_looped.py") == "torchrun"
    assert launcher_kind("slurmstepd: [1234.0]") == "srun"
    assert launcher_kind("bash") is None
    # parent A starts B; once A dies, B is re-parented: the watchdog watching (B under A) asks to stop
    parent = subprocess.Popen([sys.executable, "-c", "import subprocess, time; "
                               "p = subprocess.Popen(['sleep', '60']); print(p.pid, flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    try:
        flag = StopFlag()
        dog = LauncherWatchdog(flag, child, parent.pid, "the torchrun launcher (pid 1)", interval=0.05)
        # a rank whose stop was agreed from another rank's request, its own watchdog not having fired yet
        other = RunStops.__new__(RunStops)
        other.flag, other.watchdog = StopFlag(), LauncherWatchdog(StopFlag(), child, parent.pid, "the runner (pid 1)")
        assert not dog.gone() and other.reason() == "a stop request on another rank"
        dog.start()
        time.sleep(0.2)
        assert not flag.code
        parent.kill()
        parent.wait()
        deadline = time.time() + 10
        while not flag.code and time.time() < deadline:
            time.sleep(0.05)
        assert flag.code and flag.reason == "the torchrun launcher (pid 1) exited"
        assert other.reason() == "the runner (pid 1) exited"  # its launcher is gone too: named, not "another rank"
    finally:
        os.kill(child, signal.SIGKILL)


def test_torchrun_two_ranks_stop_at_the_time_limit_with_a_checkpoint(tmp_path, data):
    out = str(tmp_path / "tr")
    path = write_config(str(tmp_path / "tr.yaml"), tiny_config(data, out, train={
        "steps": 200, "log_interval": 1, "time_limit": "0.01", "time_limit_margin": 0}))
    env = rank_env(0, 1, 0)
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                           "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
                           "pretrain_looped.py", "--config", path], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    text = proc.stdout + proc.stderr
    assert "world 2: pp 1 x dp 2 x tp 1" in text, text[-4000:]
    assert proc.returncode == 1 and "exitcode  : 75" in text, text[-4000:]  # torchrun's own code is 1
    status = json.load(open(os.path.join(out, "run_status.json")))
    assert status["status"] == "time_limit", status
    latest = open(os.path.join(out, "checkpoints", "latest")).read().strip()
    assert latest == f"step_{status['step']:08d}"
    assert os.path.isfile(os.path.join(out, "checkpoints", latest, "megaloop_complete.json"))
    assert [r["step"] for r in metrics(out) if "loss" in r] == list(range(1, status["step"] + 1))


def _stub(path, body):
    with open(path, "w") as f:
        f.write("#!/bin/bash\n" + textwrap.dedent(body))
    os.chmod(path, os.stat(path).st_mode | stat.S_IEXEC)


@pytest.mark.parametrize("launcher,status,want_rc,requeued", [("torchrun", "time_limit", 0, True),
                                                              ("deepspeed", "finished", 0, False)])
def test_sbatch_script_derives_the_launch_from_slurm_and_requeues_on_the_time_limit(
        tmp_path, launcher, status, want_rc, requeued):
    bin_dir, log = tmp_path / "bin", tmp_path / "log"
    bin_dir.mkdir()
    _stub(bin_dir / "srun", """\
        while [ "${1#-}" != "$1" ]; do shift; done          # drop srun's options
        SLURM_NODEID=0 SLURM_PROCID=0 "$@"
        """)
    _stub(bin_dir / "scontrol", """\
        if [ "$1" = show ]; then printf 'node001\\nnode002\\n'; else echo "scontrol $*" >> "$STUB_LOG"; fi
        """)
    _stub(bin_dir / "squeue", "echo 2030-01-01T00:00:00\n")
    # The launchers: record how they were called, leave the run's status, exit as torchrun does
    record = (f'echo "launch $* | end=$SLURM_JOB_END_TIME" >> "$STUB_LOG"\n'
              f"echo '{{\"status\": \"{status}\"}}' > \"$OUTPUT_DIR/run_status.json\"\n"
              f"exit {1 if status == 'time_limit' else 0}\n")
    _stub(bin_dir / "deepspeed", 'cat "$2" >> "$STUB_LOG"\n' + record)
    _stub(bin_dir / "python", 'if [ "$1" = -m ]; then\n' + record + f'fi\nexec {sys.executable} "$@"\n')
    out = tmp_path / "run"
    out.mkdir()
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", STUB_LOG=str(log), LAUNCHER=launcher,
               PYTHON=str(bin_dir / "python"), SLURM_JOB_ID="1234", SLURM_JOB_NODELIST="node[001-002]",
               SLURM_NNODES="2", GPUS_PER_NODE="4", MEGALOOP_DIR=REPO, PYTHONPATH=REPO)
    for k in ("SLURM_JOB_END_TIME", "MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(k, None)
    proc = subprocess.run(["bash", os.path.join(REPO, "scripts", "slurm", "pretrain.sbatch"),
                           "yaml_configs/tiny/lt.yaml", f"train.output_dir={out}"], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == want_rc, proc.stdout + proc.stderr
    text = log.read_text()
    end = int(subprocess.run(["date", "-d", "2030-01-01T00:00:00", "+%s"], capture_output=True, text=True).stdout)
    assert f"end={end}" in text and f"train.time_limit=slurm train.output_dir={out}" in text, text
    if launcher == "torchrun":
        assert ("-m torch.distributed.run --nnodes 2 --node-rank 0 --nproc-per-node 4 --master-addr node001 "
                f"--master-port {20000 + 1234}") in text, text
    else:
        assert "node001 slots=4\nnode002 slots=4\n" in text and "--no_ssh --node_rank 0" in text, text
    assert ("scontrol requeue 1234" in text) == requeued, text
