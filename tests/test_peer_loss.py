"""Issue 21 item 4: every collective is bounded by train.dist_timeout, and a rank that stops answering (SIGSTOP)
or dies is named in one line by the lowest surviving rank, the last checkpoint intact.

The in-process tests check the pieces (the group timeout default torch falls back to, the NCCL watchdog
environment, the heartbeat diagnosis on a HashStore, which rank reports); one 2-rank run stops rank 1 with
SIGSTOP (the killed peer is test_train_engine.py's dead-rank run).
"""
from __future__ import annotations

import datetime
import os
import subprocess
import time

import pytest

from megaloop.training import peers
from megaloop.training.distributed import bound_group_timeouts, nccl_watchdog_env
from test_train_support import PYTHON, REPO, free_port, make_byte_dataset, rank_env, tiny_config, write_config


def test_new_groups_default_to_the_run_timeout(monkeypatch):
    """DeepSpeed creates the DP / PP / TP / ZeRO groups with new_group(ranks) and no timeout: torch then uses
    _get_default_timeout (30 min for gloo) unless bound_group_timeouts set the run's."""
    from torch.distributed import distributed_c10d as c10d
    # torch's own defaults, whatever an earlier in-process run in this pytest process set (restored after)
    monkeypatch.setattr(c10d, "default_pg_timeout", datetime.timedelta(minutes=30))
    monkeypatch.setattr(c10d, "default_pg_nccl_timeout", c10d.default_pg_nccl_timeout)
    assert c10d._get_default_timeout(c10d.Backend("gloo")) == datetime.timedelta(minutes=30)
    bound_group_timeouts(datetime.timedelta(seconds=20))
    assert c10d._get_default_timeout(c10d.Backend("gloo")) == datetime.timedelta(seconds=20)


def test_nccl_watchdog_environment():
    env = {"TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC": "900"}  # what the user exported wins
    assert nccl_watchdog_env(20, env) == {"TORCH_NCCL_ASYNC_ERROR_HANDLING": "1", "TORCH_NCCL_ENABLE_MONITORING": "1"}
    assert env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1" and env["TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC"] == "900"
    assert nccl_watchdog_env(20, {})["TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC"] == "80"
    assert "TORCH_NCCL_BLOCKING_WAIT" not in env  # (a host sync per wait())


def test_peer_failures_are_recognised():
    assert peers.is_peer_failure(RuntimeError("[unbound_buffer.cc:78] Timed out waiting 20000ms for recv operation"))
    assert peers.is_peer_failure(RuntimeError("[pair.cc:534] Connection closed by peer [127.0.0.1]:4551"))
    wrapped = RuntimeError("step failed")
    wrapped.__cause__ = RuntimeError("Connection reset by peer")
    assert peers.is_peer_failure(wrapped)
    assert not peers.is_peer_failure(RuntimeError("size mismatch for wq.weight"))
    assert not peers.is_peer_failure(ValueError("timed out waiting"))


def test_heartbeat_names_the_silent_rank_and_the_lowest_survivor_reports():
    from torch.distributed import HashStore
    store = HashStore()
    for r in range(4):
        store.add(peers.KEY.format(r), 1)

    def beats_of_live_ranks(seconds):  # ranks 0 and 2 keep beating; 1 stopped; 3 diagnosed already and left
        store.add(peers.KEY.format(0), 1)
        store.add(peers.KEY.format(2), 1)

    store.add(peers.LEFT.format(3), 1)
    assert peers.silent_ranks(store, 4, 1.0, sleep=beats_of_live_ranks) == [1]
    timeout = RuntimeError("Timed out waiting 20000ms for recv operation to complete")
    e0 = peers.describe(timeout, 0, 4, [1], 20, "/run/checkpoints/step_00000002")
    e2 = peers.describe(timeout, 2, 4, [1], 20, "/run/checkpoints/step_00000002")
    assert str(e0).startswith("rank 1 stopped answering: no reply within train.dist_timeout=20 s")
    assert "/run/checkpoints/step_00000002" in str(e0)
    assert e0.report_on_this_rank and not e2.report_on_this_rank
    # rank 0 gone: its store does not answer; rank 1 reports
    e1 = peers.describe(RuntimeError("Connection closed by peer [10.0.0.1]:1"), 1, 2, None, 20, None)
    assert str(e1).startswith("rank 0 (it hosts the rendezvous store") and "died" in str(e1)
    assert e1.report_on_this_rank and "no checkpoint was saved" in str(e1)
    # every rank alive (out of step): said so, rank 0 reports
    e = peers.describe(timeout, 0, 2, [], 20, None)
    assert "every rank is alive" in str(e) and e.report_on_this_rank


def test_a_rank_that_failed_on_its_own_is_named_with_its_line():
    """Under the launcher rank 1 hits ENOSPC in a checkpoint save (its node's disk) and exits without printing
    (not rank 0); rank 0, in the save barrier, sees "Connection closed by peer" and prints rank 1's line."""
    from torch.distributed import HashStore

    from megaloop.errors import OutputError
    store = HashStore()
    rank1 = peers.PeerWatch()
    rank1.rank, rank1.world, rank1.dist_timeout = 1, 2, 20
    rank1.heartbeat = peers.Heartbeat(store, 1, 1.0)  # (not started)
    import errno
    with pytest.raises(OutputError):  # (re-raised as it is: rank 1's run_cli exits 2, silently on rank 1)
        with rank1.name_lost_ranks(lambda: None):
            raise OutputError(OSError(errno.ENOSPC, "No space left on device"), "/run/checkpoints",
                              "the previous checkpoint /run/checkpoints/step_00000002 is intact")
    causes = peers.read_errors(store, 2)
    e = peers.describe(RuntimeError("Connection closed by peer [127.0.0.1]:5"), 0, 2, [1], 20,
                       "/run/checkpoints/step_00000002", causes)
    assert str(e).startswith("rank 1 stopped with: no space left on device: ")
    assert str(e).endswith("free space there or choose another folder); the previous checkpoint "
                           "/run/checkpoints/step_00000002 is intact")
    assert e.report_on_this_rank


def test_run_cli_prints_on_the_rank_the_error_names(capsys, monkeypatch):
    from megaloop.errors import run_cli
    monkeypatch.delenv("MEGALOOP_DEBUG", raising=False)

    def lost(report):
        def main(argv):
            raise peers.PeerLost("rank 0 died", report)
        return main

    monkeypatch.setenv("RANK", "1")
    assert run_cli(lost(True), []) == 2
    assert capsys.readouterr().err.strip() == "error: [rank 1] rank 0 died"
    monkeypatch.setenv("RANK", "0")
    assert run_cli(lost(False), []) == 2 and capsys.readouterr().err == ""


def _state(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return None


def test_stopped_rank_is_named_within_the_timeout(tmp_path):
    """SIGSTOP on rank 1 before step 4 (2 ranks, ZeRO 1, dist_timeout 15 s): rank 0 exits with code 2 within
    the timeout plus the diagnosis, one line naming rank 1 and the step-2 checkpoint, which stays `latest`."""
    from megaloop.checkpoint import layout
    data = make_byte_dataset(str(tmp_path / "corpus"), max_bytes=60_000)
    out = tmp_path / "out"
    cfg = write_config(str(tmp_path / "c.yaml"), tiny_config(data, str(out), train={
        "steps": 8, "save_interval": 2, "dist_timeout": 15, "log_interval": 1}, parallel={"zero_stage": 1}))
    port = free_port()
    procs = [subprocess.Popen([PYTHON, os.path.join(REPO, "pretrain_looped.py"), "--config", cfg], cwd=REPO,
                              env=rank_env(r, 2, port, {"MEGALOOP_FAULT": "stop_at_step:3:1"}),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    try:
        deadline = time.time() + 240
        while _state(procs[1].pid) != "T":
            assert time.time() < deadline and procs[1].poll() is None, procs[1].communicate(timeout=5)
            time.sleep(0.2)
        stopped_at = time.time()
        _, err = procs[0].communicate(timeout=120)
        waited = time.time() - stopped_at
    finally:
        for p in procs:
            p.kill()
            p.communicate()
    lines = [line for line in err.splitlines() if line.strip()]
    assert procs[0].returncode == 2 and len(lines) == 1, err[-3000:]
    assert lines[0].startswith("error: rank 1 stopped answering: no reply within train.dist_timeout=15 s"), lines[0]
    step2 = out / "checkpoints" / layout.tag_for(2)
    assert str(step2) in lines[0]
    assert layout.resolve(str(out / "checkpoints")) == step2
    assert waited < 15 + 30, waited  # the timeout, the diagnosis (~4 s) and start-up noise on 2 busy cores
