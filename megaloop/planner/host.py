"""Host (CPU) memory per node when a run starts, resumes or starts from init.from.

Per rank, the larger of:

  build     4 x the largest parameter (usually the embedding): each rank builds the LoopedLM on the meta
            device, applies tensor parallelism and keeps its pipeline stage, then draws each of its
            parameters at full size on the host, cuts its TP shard and moves it to the accelerator
            (megaloop.parallel.materialize; the same weights on any layout), one parameter at a time.
            init.from reads the source the same way, one (merged) parameter at a time from its
            memory-mapped files (megaloop.checkpoint.lazy_state_dict). On the CPU accelerator the rank's
            own parameters are host memory too (that is the device); not counted here.
  resume    the rank's own share of the checkpoint: its weights, fp32 master copy and AdamW moments
            (memory.state_bytes without gradients). On the same layout DeepSpeed reads the rank's own
            files whole; on another layout megaloop reads one parameter at a time from the memory-mapped
            files (megaloop.checkpoint.relayout), so the host holds at most this, usually one
            parameter's slice.

Per node: ranks per node x that. Not counted: the page cache of the memory-mapped checkpoint files
(file-backed, shared by the node's ranks, reclaimable: at most the files the node's ranks read), the
interpreter and library images (~1-2 GiB per rank with torch, DeepSpeed and CUDA).
"""
from __future__ import annotations

from megaloop.planner.memory import state_bytes


def host_load_bytes(largest_param: int, rank_params: int, precision: str, bf16_impl: str, zero_stage: int,
                    dp: int, ranks_per_node: int) -> dict:
    """Bytes of host memory per rank and per node at start / resume (see the module docstring).
    largest_param: the model's largest parameter's element count; rank_params: the largest (stage, TP rank)
    parameter count."""
    build = 4 * largest_param
    st = state_bytes(rank_params, precision, bf16_impl, zero_stage, dp)
    resume = st.weights + st.master + st.optimizer
    per_rank = max(build, resume)
    return {"build_bytes_per_rank": build, "resume_bytes_per_rank": resume, "per_rank_bytes": per_rank,
            "ranks_per_node": ranks_per_node, "per_node_bytes": per_rank * ranks_per_node}
