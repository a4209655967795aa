"""Process-group setup and the parallel layout (DP x PP x TP) of a training run.

Everything goes through `deepspeed.comm` and `deepspeed.accelerator`: the same code runs with gloo on
CPU (`DS_ACCELERATOR=cpu`) and with NCCL on CUDA clusters. The rank's place comes from the environment the
launcher sets (deepspeed and torchrun: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), from
SLURM's variables for ranks started by srun itself, and `python pretrain_looped.py` without a launcher gets a
one-rank world (filled in here).
"""
from __future__ import annotations

import datetime
import errno
import os
import socket

import torch

from megaloop.errors import MegaloopError


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def first_host(nodelist: str) -> str:
    """The first host of a Slurm hostlist ("gpu[003-005,9],cpu1" -> "gpu003"; "a[1-2]-b[07-08]" -> "a1-b07")."""
    depth, end = 0, len(nodelist)
    for i, ch in enumerate(nodelist):  # the first entry: up to the first comma outside brackets
        depth += (ch == "[") - (ch == "]")
        if ch == "," and depth == 0:
            end = i
            break
    entry, out = nodelist[:end].strip(), ""
    while "[" in entry:
        head, rest = entry.split("[", 1)
        ranges, entry = rest.split("]", 1)
        out += head + ranges.split(",")[0].split("-")[0]
    return out + entry


def _tasks_on_node(spec: str, node: int) -> int:
    """The task count of node `node` in SLURM_STEP_TASKS_PER_NODE ("4(x2),3": nodes 0-1 have 4, node 2 has 3)."""
    counts = []
    for part in spec.split(","):
        n, _, rep = part.partition("(x")
        counts += [int(n)] * (int(rep.rstrip(")")) if rep else 1)
    return counts[min(node, len(counts) - 1)]


def fill_from_slurm(env=None) -> bool:
    """Ranks started by srun itself (one task per GPU, no launcher in between): RANK, WORLD_SIZE, LOCAL_RANK,
    LOCAL_SIZE from the step's task ids and MASTER_ADDR from its first node (MASTER_PORT, unless given, from
    the job id, the same on every task). Left alone when a launcher (deepspeed, torchrun) set RANK, and
    outside an srun step of several tasks. Returns whether it filled anything."""
    env = os.environ if env is None else env
    if "RANK" in env or int(env.get("SLURM_STEP_NUM_TASKS", "1")) < 2 or "SLURM_PROCID" not in env:
        return False
    node = int(env.get("SLURM_NODEID", "0"))
    env.update(RANK=env["SLURM_PROCID"], WORLD_SIZE=env["SLURM_STEP_NUM_TASKS"],
               LOCAL_RANK=env.get("SLURM_LOCALID", "0"), LOCAL_SIZE=str(_tasks_on_node(env.get("SLURM_STEP_TASKS_PER_NODE", "1"), node)))
    env.setdefault("MASTER_ADDR", first_host(env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST", "")))
    env.setdefault("MASTER_PORT", str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000))
    return True


def _fill_single_rank_env() -> None:
    """A run started with plain `python`: a world of one rank (or srun's tasks: fill_from_slurm)."""
    fill_from_slurm()
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        os.environ.setdefault("LOCAL_RANK", "0")
        return
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_SIZE="1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))


def init_distributed(timeout_s: float = 600.0) -> None:
    """Initialise deepspeed.comm with the accelerator's backend and a bounded timeout.

    The timeout bounds the rendezvous and every collective of every process group (bound_group_timeouts; NCCL:
    nccl_watchdog_env): the survivors of a rank that died or stopped fail with an error instead of hanging, and
    megaloop.training.peers names that rank. A rendezvous that fails (a port taken, rank 0 unreachable) is one
    line (DistributedSetupError)."""
    import deepspeed
    import deepspeed.comm as dist
    from deepspeed.accelerator import get_accelerator

    if dist.is_initialized():
        return
    _fill_single_rank_env()
    if not torch.distributed.is_initialized():  # (a process group made by the caller holds the port itself)
        check_master_port()
    nccl_watchdog_env(timeout_s)
    acc = get_accelerator()
    if acc.device_name() == "cpu" and os.environ.get("MEGALOOP_DS_SHM_OP", "0") != "1":
        # DeepSpeed's CPU backend JIT-builds a shared-memory op that only serves
        # inference_all_reduce (never used in training). Its build (~30-100 s on a busy 2-core box,
        # repeated whenever the shared torch_extensions cache is rebuilt by another process) would
        # dominate every launch, and its shared-memory segments can collide between jobs on one host.
        import importlib
        # (not `import deepspeed.comm.torch as m`: the package re-exports `torch`, so that name
        # resolves to the torch module itself)
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    backend = "gloo" if acc.device_name() == "cpu" else acc.communication_backend_name()
    timeout = datetime.timedelta(seconds=float(timeout_s))
    bound_group_timeouts(timeout)
    import torch.distributed as tdist
    try:
        if acc.device_name() != "cpu":
            # The rank's device first, then the process group bound to it (`device_id`): NCCL then neither
            # guesses the device ("using GPU N ... guessing device ID") nor puts two ranks on one GPU.
            local = int(os.environ.get("LOCAL_RANK", "0"))
            acc.set_device(local)
            if not tdist.is_initialized():
                try:
                    tdist.init_process_group(backend, timeout=timeout,
                                             device_id=torch.device(acc.device_name(), local))
                except TypeError:  # a torch without device_id
                    tdist.init_process_group(backend, timeout=timeout)
        # (DeepSpeed adopts a process group that already exists.)
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, timeout=timeout, verbose=False)
    except getattr(tdist, "DistError", RuntimeError) as e:  # the rendezvous store: refused, timed out, port taken
        from megaloop.errors import one_line
        env = os.environ
        err = DistributedSetupError(
            f"rank {env.get('RANK')} of {env.get('WORLD_SIZE')} could not join the others at MASTER_ADDR:MASTER_PORT "
            f"{env.get('MASTER_ADDR')}:{env.get('MASTER_PORT')} within train.dist_timeout={float(timeout_s):g} s "
            f"({one_line(e)[:160]}): start every rank with the same MASTER_ADDR, MASTER_PORT and WORLD_SIZE, and "
            f"check that rank 0 runs and its host is reachable")
        # A rank that could not even reach rank 0's store says so itself (rank 0, which would, is missing).
        err.report_on_this_rank = env.get("RANK", "0") == "0" or isinstance(e, getattr(tdist, "DistNetworkError", ()))
        raise err from None


class DistributedSetupError(MegaloopError, RuntimeError):
    """The process group cannot start (the rendezvous port is taken, ...); the message says what to change."""


def check_master_port(environ=None) -> None:
    """On rank 0, which opens the rendezvous store on MASTER_PORT: refuse a port another program already listens
    on, at once (torch would retry for its connect timeout and then print EADDRINUSE on every rank). Skipped
    under torchrun's agent, whose own store holds the port on purpose."""
    env = os.environ if environ is None else environ
    if env.get("RANK", "0") != "0" or env.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true":
        return
    port = env.get("MASTER_PORT")
    if not port or not port.isdigit():
        return
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # (a port left in TIME_WAIT is free to listen on)
        try:
            s.bind(("", int(port)))
        except OSError as e:
            if e.errno != errno.EADDRINUSE:
                return
            raise DistributedSetupError(
                f"MASTER_PORT {port} is already in use on this host (another run or program listens there): "
                f"choose a free port (deepspeed --master_port N, or MASTER_PORT=N)") from None


def nccl_watchdog_env(timeout_s: float, environ=None) -> dict:
    """The environment that makes NCCL honour the timeout, set before the first process group (values the
    user exported win). Returns what was set.

    TORCH_NCCL_ASYNC_ERROR_HANDLING=1: the watchdog thread, on a collective past the timeout (or an NCCL
    error), aborts the communicators and ends the process (torch's default, 3, skips the abort, and 0 would
    hang). TORCH_NCCL_ENABLE_MONITORING / TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC: a watchdog stuck itself (a hung
    CUDA call) ends the process after the timeout plus a minute, not the default 8 minutes.
    TORCH_NCCL_BLOCKING_WAIT is left off: it makes every wait() a host sync."""
    env = os.environ if environ is None else environ
    wanted = {"TORCH_NCCL_ASYNC_ERROR_HANDLING": "1", "TORCH_NCCL_ENABLE_MONITORING": "1",
              "TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC": str(int(float(timeout_s)) + 60)}
    set_now = {k: v for k, v in wanted.items() if not env.get(k)}
    env.update(set_now)
    return set_now


def bound_group_timeouts(timeout: datetime.timedelta) -> None:
    """Make `timeout` the default of every process group created from now on in this process.

    DeepSpeed creates the data-, pipeline-, tensor- and ZeRO-parallel groups with `new_group(ranks)`,
    passing no timeout; torch then gives each of them its backend's default (30 minutes for gloo, 10 for
    NCCL), not the world group's. A rank that stopped answering (SIGSTOP, a hung host) left the others
    blocked in a data-parallel all-reduce for 30 minutes although train.dist_timeout was 20 s. torch
    reads these two module defaults whenever a group is created without a timeout."""
    from torch.distributed import distributed_c10d as c10d
    c10d.default_pg_timeout = timeout
    if isinstance(getattr(c10d, "default_pg_nccl_timeout", None), datetime.timedelta):
        c10d.default_pg_nccl_timeout = timeout


def build_state(parallel_cfg):
    """The (pipe, data, tensor) grid: megaloop.parallel.topology's ParallelState (DeepSpeed's
    PipeModelDataParallelTopology + PipelineParallelGrid, also used as DeepSpeed's `mpu`)."""
    from megaloop.parallel.topology import build_parallel_state
    return build_parallel_state(parallel_cfg)


def is_logging_rank(state) -> bool:
    """Last pipeline stage (it holds the loss), data-parallel rank 0, tensor-parallel rank 0."""
    return state.is_last_stage and state.dp_rank == 0 and state.tp_rank == 0



def quiet_deepspeed() -> None:
    """Keep the console to megaloop's lines: DeepSpeed's INFO chatter off (MEGALOOP_DS_LOG=info keeps
    it), and the known-harmless autograd warning from the pipeline's tied-weight broadcast muted."""
    import logging
    import warnings
    if os.environ.get("MEGALOOP_DS_LOG", "warning").lower() != "info":
        from deepspeed.utils import logger as ds_logger
        ds_logger.setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r"c10d::broadcast_: an autograd kernel was not registered")
    warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor.* is deprecated")
