"""Helpers for the multi-process training tests (no tests here).

Ranks are plain `python pretrain_looped.py` processes with RANK / WORLD_SIZE / MASTER_* set (what the
deepspeed launcher would set), one thread each, a free port per run and a hard timeout per run, so a
hang fails the test instead of stalling CI.
"""
import json
import os
import socket
import sys
import time

import numpy as np
import yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYTHON = sys.executable


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_byte_dataset(prefix: str, max_bytes: int = 400_000) -> str:
    """A small byte-tokenized corpus (Python standard-library sources: real text, so loss falls)."""
    from megaloop.data.indexed_dataset import IndexedDatasetWriter
    root = os.path.dirname(os.__file__)
    names = sorted(n for n in os.listdir(root) if n.endswith(".py"))
    total = 0
    with IndexedDatasetWriter(prefix, np.uint16) as w:
        for name in names:
            data = open(os.path.join(root, name), "rb").read()
            w.add_document(np.frombuffer(data, dtype=np.uint8).astype(np.uint16).tolist() + [256])
            total += len(data)
            if total >= max_bytes:
                break
    return prefix


def tiny_config(data_prefix: str, output_dir: str, **sections) -> dict:
    cfg = {
        "model": {"vocab_size": 258, "d_model": 32, "n_heads": 4, "max_seq_len": 32, "n_loop": 1,
                  "n_prelude": 0, "n_coda": 0, "loops": 2, "arch": "recurrent", "injection": "add"},
        # (recurrent + add injection: the output depends strongly on R from init on; an FLT at init barely
        # depends on R - near-uniform attention ignores the query - which would make R mismatches invisible)
        "loop": {"sampling": "fixed", "mean": 2},
        "data": {"data_path": [data_prefix], "seq_len": 32, "split": "95,5,0"},
        "train": {"steps": 6, "micro_batch_size": 4, "grad_accum_steps": 1, "lr": 3e-3, "warmup_steps": 2,
                  "log_interval": 3, "eval_interval": 0, "save_interval": 0, "output_dir": output_dir,
                  "tensorboard": False},
        "parallel": {},
    }
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    return cfg


def write_config(path: str, cfg: dict) -> str:
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f)
    return path


def rank_env(rank: int, world: int, port: int, extra=None) -> dict:
    env = dict(os.environ)
    env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_SIZE=str(world),
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu",
               PYTHONPATH=REPO + os.pathsep + env.get("PYTHONPATH", ""))
    env.pop("MEGALOOP_FAULT", None)
    if extra:
        env.update(extra)
    return env


def run_ranks(world: int, args, timeout: float = 120, env=None, rank_env_extra=None, script=None):
    """Run `world` ranks of pretrain_looped.py (or `script`); returns [(returncode, output)] per rank.

    Each rank is a process forked from tests/preloaded.py's server, running the script as `python script args`
    would (its imports already done). A run that exceeds `timeout` is killed (returncode None)."""
    import tempfile
    from preloaded import start_script

    port = free_port()
    procs, outs = [], []
    with tempfile.TemporaryDirectory(prefix="megaloop-ranks-") as tmp:
        for r in range(world):
            extra = dict(env or {})
            if rank_env_extra and r in rank_env_extra:
                extra.update(rank_env_extra[r])
            outs.append(os.path.join(tmp, f"rank{r}.log"))
            procs.append(start_script(script or os.path.join(REPO, "pretrain_looped.py"), args,
                                      rank_env(r, world, port, extra), REPO, outs[-1]))
        deadline = time.time() + timeout
        timed_out = False
        for p in procs:
            p.join(timeout=max(0.0, deadline - time.time()))
            if p.is_alive():
                timed_out = True
                break
        if timed_out:
            for p in procs:
                if p.is_alive():
                    p.kill()
            for p in procs:
                p.join(timeout=10)
        results = []
        for p, out in zip(procs, outs):
            with open(out, errors="replace") as f:
                text = f.read()
            results.append((None if timed_out and p.exitcode in (None, -9) else p.exitcode, text))
    return results


def assert_ok(results):
    bad = [(r, rc, out) for r, (rc, out) in enumerate(results) if rc != 0]
    assert not bad, "\n".join(f"--- rank {r} exited with {rc}:\n{out[-3000:]}" for r, rc, out in bad)


def metrics(output_dir: str) -> list:
    path = os.path.join(output_dir, "metrics.jsonl")
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def train_losses(output_dir: str) -> dict:
    """step -> loss (the last record per step wins: a resumed run re-logs steps after its checkpoint)."""
    return {row["step"]: row["loss"] for row in metrics(output_dir) if "loss" in row}


def train_rows(output_dir: str) -> dict:
    return {row["step"]: row for row in metrics(output_dir) if "loss" in row}
