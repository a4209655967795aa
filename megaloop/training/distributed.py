"""Process-group setup and the parallel layout (DP x PP x TP) of a training run.

Everything goes through `deepspeed.comm` and `deepspeed.accelerator`: the same code runs with gloo on
CPU (`DS_ACCELERATOR=cpu`) and with NCCL on CUDA clusters. `python pretrain_looped.py` without the
launcher gets a one-rank world (RANK/WORLD_SIZE/MASTER_* filled in here).
"""
from __future__ import annotations

import datetime
import os
import socket

import torch


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fill_single_rank_env() -> None:
    """A run started with plain `python`: a world of one rank."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        os.environ.setdefault("LOCAL_RANK", "0")
        return
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_SIZE="1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))


def init_distributed(timeout_s: float = 600.0) -> None:
    """Initialise deepspeed.comm with the accelerator's backend and a bounded timeout.

    The timeout bounds how long a collective waits for a rank that died: the survivors fail with an
    error instead of hanging (the deepspeed launcher then kills the remaining siblings)."""
    import deepspeed
    import deepspeed.comm as dist
    from deepspeed.accelerator import get_accelerator

    if dist.is_initialized():
        return
    _fill_single_rank_env()
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
    if acc.device_name() != "cpu":
        # The rank's device first, then the process group bound to it (`device_id`): NCCL then neither
        # guesses the device ("using GPU N ... guessing device ID") nor puts two ranks on one GPU.
        local = int(os.environ.get("LOCAL_RANK", "0"))
        acc.set_device(local)
        import torch.distributed as tdist
        if not tdist.is_initialized():
            try:
                tdist.init_process_group(backend, timeout=timeout,
                                         device_id=torch.device(acc.device_name(), local))
            except TypeError:  # a torch without device_id
                tdist.init_process_group(backend, timeout=timeout)
    # (DeepSpeed adopts a process group that already exists.)
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, timeout=timeout, verbose=False)


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
