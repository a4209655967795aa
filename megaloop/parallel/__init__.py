"""Megatron-style parallelism for the looped model family.

topology   ParallelState / build_parallel_state: the (pipe, data, tensor) grid on DeepSpeed's topology.
"""
from megaloop.parallel.topology import (ParallelLayoutError, ParallelState, build_parallel_state,
                                        default_backend, grid_dims)

__all__ = ["ParallelLayoutError", "ParallelState", "build_parallel_state", "default_backend", "grid_dims"]
