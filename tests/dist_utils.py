"""Run a function on N ranks of a real torch.distributed job, as spawned processes, for tests.

    from dist_utils import run_distributed
    results = run_distributed(fn, world_size=2, args=(cfg_path,), timeout=120)

`fn(rank, world_size, *args)` must be importable by name (a module-level function): each rank is a
fresh process (see below) that imports it. Each rank gets one thread (`OMP_NUM_THREADS=1`,
`torch.set_num_threads(1)`), `DS_ACCELERATOR=cpu` unless set, a process group on a free port
(`gloo` by default), and the usual env:// variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
MASTER_PORT), so `deepspeed.comm` and launcher-style code work unchanged inside `fn`.

Ranks are forked from tests/preloaded.py's server (torch, DeepSpeed and megaloop imported once per session)
and take the calling process's environment at the time of the call.

The return value of `fn` on every rank is sent back (serialised with `torch.save`, so tensors and
plain Python values both work) and `run_distributed` returns the list, indexed by rank. If any rank
raises, the other ranks are killed and the first error is re-raised here with the rank's traceback.
If the job runs past `timeout` seconds (a hang in a collective, typically), every rank is killed and
a `TimeoutError` names the ranks that had not finished; a hang fails the test, it never stalls CI.
"""
from __future__ import annotations

import io
import os
import queue
import socket
import time
import traceback
from datetime import timedelta
from typing import Any, Callable, List, Optional, Sequence

import torch

from preloaded import apply_env, context


def free_port() -> int:
    """A TCP port that was free a moment ago (bound to port 0 and released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class DistributedTestError(RuntimeError):
    """A rank raised; the message carries that rank's traceback."""


def _dumps(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _loads(data: bytes) -> Any:
    return torch.load(io.BytesIO(data), weights_only=False)


def _worker(rank: int, world_size: int, port: int, backend: str, fn: Callable, args: tuple,
            caller_env: dict, env: dict, results, collective_timeout_s: float) -> None:
    apply_env(caller_env)
    os.environ.update({"OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                       "RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank),
                       "LOCAL_SIZE": str(world_size)})
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.update(env)
    torch.set_num_threads(1)
    import torch.distributed as dist
    try:
        dist.init_process_group(backend, rank=rank, world_size=world_size,
                                init_method=f"tcp://127.0.0.1:{port}",
                                timeout=timedelta(seconds=collective_timeout_s))
        out = fn(rank, world_size, *args)
        results.put((rank, "ok", _dumps(out)))
    except BaseException:  # noqa: BLE001 - everything goes back to the parent
        results.put((rank, "error", traceback.format_exc()))
    finally:
        try:
            if dist.is_initialized():
                dist.destroy_process_group()
        except Exception:  # noqa: BLE001
            pass


def run_distributed(fn: Callable, world_size: int = 2, args: Sequence = (), timeout: float = 120.0,
                    backend: str = "gloo", env: Optional[dict] = None) -> List[Any]:
    """Run `fn(rank, world_size, *args)` on `world_size` spawned ranks; return the per-rank results.

    timeout: seconds for the whole job (start-up included); past it, every rank is killed.
    env:     extra environment variables for the ranks.
    """
    ctx = context()
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, daemon=True,
                         args=(r, world_size, port, backend, fn, tuple(args), dict(os.environ), dict(env or {}),
                               results, max(30.0, timeout)))
             for r in range(world_size)]
    for p in procs:
        p.start()
    out: dict = {}
    error = None
    deadline = time.monotonic() + timeout
    try:
        while len(out) < world_size and error is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                missing = sorted(set(range(world_size)) - set(out))
                raise TimeoutError(f"distributed test {getattr(fn, '__name__', fn)} ran past {timeout:.0f}s; "
                                   f"ranks {missing} had not finished (a hang in a collective?)")
            try:
                rank, status, payload = results.get(timeout=min(remaining, 1.0))
            except queue.Empty:
                dead = [r for r, p in enumerate(procs) if r not in out and not p.is_alive() and p.exitcode]
                if dead:
                    # A rank died without reporting (killed, segfault); give the queue a moment first.
                    try:
                        rank, status, payload = results.get(timeout=2.0)
                    except queue.Empty:
                        raise DistributedTestError(
                            f"rank(s) {dead} exited with code(s) {[procs[r].exitcode for r in dead]} "
                            f"without a result")
                else:
                    continue
            if status == "ok":
                out[rank] = _loads(payload)
            else:
                error = DistributedTestError(f"rank {rank} of {world_size} raised:\n{payload}")
        if error is not None:
            raise error
    finally:
        for p in procs:
            p.join(timeout=5.0 if error is None and len(out) == world_size else 0.5)
            if p.is_alive():
                p.kill()
                p.join(timeout=5.0)
        results.close()
    return [out[r] for r in range(world_size)]
