"""The (pipeline, data, tensor) process grid and the groups derived from it, passed explicitly.

The grid is DeepSpeed's own `PipeModelDataParallelTopology(num_pp, num_mp, num_dp)` with axes
`['pipe', 'data', 'model']` (the last axis varies fastest: tensor-parallel ranks are adjacent global
ranks, as in Megatron, so TP traffic stays inside a node). Its groups come from DeepSpeed's
`PipelineParallelGrid`, which is also what the pipeline engine builds from the same topology and what
`deepspeed.initialize(mpu=...)` accepts, so the pipeline/ZeRO code and the TP layers agree on who is
who. Example, world 8 = PP 2 x DP 2 x TP 2:

    global rank:  0 1 | 2 3 | 4 5 | 6 7
    pipe stage:   0 0   0 0   1 1   1 1
    data rank:    0 0   1 1   0 0   1 1
    tensor rank:  0 1   0 1   0 1   0 1

Nothing here is global: `build_parallel_state(cfg.parallel)` returns a `ParallelState` that the caller
passes to whoever needs a group (`apply_tensor_parallel(model, state)`, the data loader (seed and
shard by `dp_rank`), the pipeline engine (`topology`, `grid`)). With one process, or without
torch.distributed, `ParallelState.single()` is the trivial 1 x 1 x 1 state whose groups are None.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Optional

import torch.distributed as dist

from megaloop.errors import MegaloopError


class ParallelLayoutError(MegaloopError, ValueError):
    """The world size does not factor into the requested (pipeline, tensor, data) grid."""


@dataclass
class ParallelState:
    """Who this process is in the (pipe, data, tensor) grid and the process groups it talks over.

    tp_*: tensor-parallel group (ranks holding shards of the same layers; see the table above).
    dp_*: data-parallel group (same stage and TP rank, different data; gradients are averaged here).
    pp_*: pipeline group (the stages of one model replica); pp_rank is the stage id.
    mp_*: DeepSpeed's "model parallel" group = every rank of one model replica (pipe x tensor): what
          DeepSpeed uses for overflow checks and grad-norm reductions.
    topology / grid: DeepSpeed's objects (None in the trivial state). `grid` is a valid `mpu` for
          `deepspeed.initialize`, and `topology` is what `deepspeed.pipe.PipelineModule(topology=...)`
          wants.
    A group is None when its size is 1 and torch.distributed is not initialised (single process).
    """

    world_size: int = 1
    global_rank: int = 0
    tp_size: int = 1
    tp_rank: int = 0
    tp_group: Any = None
    tp_ranks: List[int] = field(default_factory=lambda: [0])
    dp_size: int = 1
    dp_rank: int = 0
    dp_group: Any = None
    dp_ranks: List[int] = field(default_factory=lambda: [0])
    pp_size: int = 1
    pp_rank: int = 0
    pp_group: Any = None
    pp_ranks: List[int] = field(default_factory=lambda: [0])
    mp_group: Any = None
    sequence_parallel: bool = False
    backend: Optional[str] = None
    topology: Any = None
    grid: Any = None

    # --- the trivial state -----------------------------------------------------------------
    @classmethod
    def single(cls, sequence_parallel: bool = False) -> "ParallelState":
        """One process: every degree 1, every group None, every collective a no-op."""
        return cls(sequence_parallel=sequence_parallel)

    # --- convenience ------------------------------------------------------------------------
    @property
    def stage_id(self) -> int:
        return self.pp_rank

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    @property
    def tp_src_rank(self) -> int:
        """Global rank of TP rank 0 of this process's TP group (source for TP broadcasts)."""
        return self.tp_ranks[0]

    @property
    def dp_src_rank(self) -> int:
        return self.dp_ranks[0]

    @property
    def data_seed_rank(self) -> int:
        """The index that data order and data-dependent seeds must use: the data-parallel rank.
        All TP ranks (and all stages) of one replica see the same tokens."""
        return self.dp_rank

    def describe(self) -> str:
        return (f"rank {self.global_rank}/{self.world_size}: pp {self.pp_rank}/{self.pp_size} "
                f"dp {self.dp_rank}/{self.dp_size} tp {self.tp_rank}/{self.tp_size} "
                f"(tp ranks {self.tp_ranks}, dp ranks {self.dp_ranks}, pp ranks {self.pp_ranks})")


def grid_dims(world_size: int, tensor_parallel: int, pipeline_parallel: int) -> int:
    """The data-parallel degree world / (tp * pp), or a ParallelLayoutError naming the numbers."""
    tp, pp = int(tensor_parallel), int(pipeline_parallel)
    if tp < 1 or pp < 1:
        raise ParallelLayoutError(f"parallel.tensor_parallel={tp} and parallel.pipeline_parallel={pp} must be >= 1")
    if world_size % (tp * pp):
        raise ParallelLayoutError(
            f"world size {world_size} is not divisible by parallel.tensor_parallel={tp} x "
            f"parallel.pipeline_parallel={pp} = {tp * pp}; the data-parallel degree would not be an integer")
    return world_size // (tp * pp)


def _ensure_deepspeed_comm(backend: Optional[str]) -> None:
    """DeepSpeed's grid talks through deepspeed.comm; wrap the already-initialised torch.distributed."""
    import deepspeed.comm as ds_comm
    if not ds_comm.is_initialized():
        ds_comm.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False,
                                 dist_init_required=False)


def check_world_size(parallel_cfg) -> None:
    """parallel.expected_world_size (when set) must be the launched world size: the deepspeed launcher runs
    on local resources alone, after a warning, when its --hostfile cannot be read."""
    expected = int(getattr(parallel_cfg, "expected_world_size", 0) or 0)
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    if expected and world != expected:
        raise ParallelLayoutError(
            f"parallel.expected_world_size={expected} but {world} rank(s) were launched: check the launcher's "
            f"--hostfile (deepspeed falls back to this machine alone when it cannot read it) and --num_gpus / "
            f"--num_nodes, or set parallel.expected_world_size={world}")


def build_parallel_state(parallel_cfg=None, *, tensor_parallel: Optional[int] = None,
                         pipeline_parallel: Optional[int] = None,
                         sequence_parallel: Optional[bool] = None) -> ParallelState:
    """Build the grid and its groups. Call after torch.distributed is initialised, on every rank
    (creating groups is collective). `parallel_cfg` is `Config.parallel` (tensor_parallel,
    pipeline_parallel, sequence_parallel); keyword arguments override it.

    Without torch.distributed (or with one process and degrees 1) this returns the trivial state.
    """
    tp = tensor_parallel if tensor_parallel is not None else getattr(parallel_cfg, "tensor_parallel", 1)
    pp = pipeline_parallel if pipeline_parallel is not None else getattr(parallel_cfg, "pipeline_parallel", 1)
    sp = sequence_parallel if sequence_parallel is not None else getattr(parallel_cfg, "sequence_parallel", False)
    check_world_size(parallel_cfg)
    if not (dist.is_available() and dist.is_initialized()):
        if tp != 1 or pp != 1:
            raise ParallelLayoutError(
                f"parallel.tensor_parallel={tp}, parallel.pipeline_parallel={pp} need torch.distributed to be "
                f"initialised with tp*pp={tp * pp} or more processes; it is not initialised")
        return ParallelState.single(sequence_parallel=bool(sp and tp > 1))
    world = dist.get_world_size()
    dp = grid_dims(world, tp, pp)
    if sp and tp == 1:
        sp = False  # sequence parallelism only means something with TP > 1
    backend = dist.get_backend()
    _ensure_deepspeed_comm(backend)
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology, PipelineParallelGrid

    topo = PipeModelDataParallelTopology(num_pp=pp, num_mp=tp, num_dp=dp)
    grid = PipelineParallelGrid(topology=topo)
    rank = dist.get_rank()
    coord = topo.get_coord(rank)
    return ParallelState(
        world_size=world, global_rank=rank,
        tp_size=tp, tp_rank=coord.model, tp_group=grid.get_slice_parallel_group(),
        tp_ranks=list(grid.slice_group),
        dp_size=dp, dp_rank=coord.data, dp_group=grid.get_data_parallel_group(),
        dp_ranks=list(grid.get_data_parallel_group_ranks()),
        pp_size=pp, pp_rank=coord.pipe, pp_group=grid.get_pipe_parallel_group(), pp_ranks=list(grid.pp_group),
        mp_group=grid.get_model_parallel_group(), sequence_parallel=bool(sp), backend=backend,
        topology=topo, grid=grid)


def default_backend() -> str:
    """The torch.distributed backend for this machine's accelerator: nccl (or the accelerator's own
    backend) on GPUs, gloo on CPU."""
    from deepspeed.accelerator import get_accelerator
    acc = get_accelerator()
    if acc.device_name() == "cpu":
        return "gloo"
    return acc.communication_backend_name()
