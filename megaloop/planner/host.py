"""Host (CPU) memory per node when a run starts, resumes or starts from init.from.

Per rank, the larger of:

  build     4 x all parameters: every rank builds the full LoopedLM in fp32 on the host (seeded: the same
            weights on any layout) before tensor parallelism cuts its shard and the pipeline keeps its
            stage (megaloop.training.engine.build_engine); transient, then moved to the accelerator.
            init.from adds the source's weights while they are copied in: none when the source was
            saved with TP = 1 (its files are memory-mapped: views, no copy), 4 x all parameters when
            its TP shards must be merged (megaloop.checkpoint.reader).
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


def host_load_bytes(total_params: int, rank_params: int, precision: str, bf16_impl: str, zero_stage: int,
                    dp: int, ranks_per_node: int) -> dict:
    """Bytes of host memory per rank and per node at start / resume (see the module docstring).
    rank_params: the largest (stage, TP rank) parameter count."""
    build = 4 * total_params
    st = state_bytes(rank_params, precision, bf16_impl, zero_stage, dp)
    resume = st.weights + st.master + st.optimizer
    per_rank = max(build, resume)
    return {"build_bytes_per_rank": build, "resume_bytes_per_rank": resume, "per_rank_bytes": per_rank,
            "ranks_per_node": ranks_per_node, "per_node_bytes": per_rank * ranks_per_node}
