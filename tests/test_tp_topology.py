"""The (pipe, data, tensor) grid: DeepSpeed's topology, groups passed explicitly."""
import pytest
import torch
import torch.distributed as dist

from dist_utils import run_distributed
from megaloop.config import ParallelConfig
from megaloop.parallel import ParallelLayoutError, ParallelState, build_parallel_state, grid_dims


def _layouts(rank, world):
    out = {}
    for tp, pp in [(2, 1), (2, 2), (1, 2)]:
        st = build_parallel_state(ParallelConfig(tensor_parallel=tp, pipeline_parallel=pp))
        # The TP group really is the TP group: a sum over it adds exactly the tp ranks listed.
        x = torch.tensor([float(rank)])
        dist.all_reduce(x, group=st.tp_group)
        y = torch.tensor([float(rank)])
        dist.all_reduce(y, group=st.dp_group)
        out[(tp, pp)] = dict(tp=(st.tp_rank, st.tp_size, st.tp_ranks), dp=(st.dp_rank, st.dp_size, st.dp_ranks),
                             pp=(st.pp_rank, st.pp_size, st.pp_ranks), tp_sum=x.item(), dp_sum=y.item(),
                             first=st.is_first_stage, last=st.is_last_stage,
                             mpu_tp=st.grid.get_tensor_model_parallel_world_size())
    return out


def test_grid_groups_on_four_ranks():
    res = run_distributed(_layouts, world_size=4, timeout=120)
    for rank, r in enumerate(res):
        # TP 2 x DP 2: tensor ranks adjacent (Megatron order), data ranks strided.
        a = r[(2, 1)]
        assert a["tp"] == (rank % 2, 2, [rank - rank % 2, rank - rank % 2 + 1])
        assert a["dp"][:2] == (rank // 2, 2) and a["dp"][2] == [rank % 2, rank % 2 + 2]
        assert a["tp_sum"] == sum(a["tp"][2]) and a["dp_sum"] == sum(a["dp"][2])
        assert a["mpu_tp"] == 2
        # PP 2 x TP 2: stages are the slow axis.
        b = r[(2, 2)]
        assert b["pp"][:2] == (rank // 2, 2) and b["tp"][:2] == (rank % 2, 2) and b["dp"][1] == 1
        assert b["first"] == (rank < 2) and b["last"] == (rank >= 2)
        c = r[(1, 2)]
        assert c["tp"][1] == 1 and c["tp_sum"] == rank and c["dp"][1] == 2


def test_single_process_state_and_bad_layouts():
    st = build_parallel_state(ParallelConfig())
    assert isinstance(st, ParallelState) and st.tp_size == st.dp_size == st.pp_size == 1
    assert st.tp_group is None and st.is_first_stage and st.is_last_stage
    with pytest.raises(ParallelLayoutError, match="tensor_parallel=2"):
        build_parallel_state(ParallelConfig(tensor_parallel=2))
    with pytest.raises(ParallelLayoutError, match=r"world size 6 .*tensor_parallel=4"):
        grid_dims(6, 4, 1)
    assert grid_dims(8, 2, 2) == 2
