"""Megatron-style parallelism for the looped model family.

topology        ParallelState / build_parallel_state: the (pipe, data, tensor) grid on DeepSpeed's
                PipeModelDataParallelTopology + PipelineParallelGrid, groups passed explicitly.
comm            TPComm (TP group + collective counter), Megatron's f/g autograd operators.
tensor_parallel ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding, Partition tags.
cross_entropy   vocab-parallel cross-entropy (and the successive-loop KL for Huginn's exit).
grad_norm       the global grad norm (each distinct element once over TP x PP) and clipping by it.
device          on_accelerator: host values as device tensors for collectives.
random          RNGTracker (model-parallel dropout stream, recompute-safe), set_parallel_seed.
apply_tp        apply_tensor_parallel(model, state): the in-place "parallelize" step; gather/merge
                of shards and the partition convention; install_tp_grad_hooks (the one TP gradient reduction).
tp_plans        the per-module TP plans (attention, GDN, DSA, MLP; register_tp_plan for a new mixer).
"""
from megaloop.parallel.topology import (ParallelLayoutError, ParallelState, build_parallel_state,
                                        default_backend, grid_dims)
from megaloop.parallel.comm import CollectiveCounter, TPComm
from megaloop.parallel.apply_tp import (TensorParallelError, apply_tensor_parallel, check_replicated_parameters,
                                        install_tp_grad_hooks, gather_full_grads, gather_full_state_dict, gather_logits,
                                        merge_tp_shards, partition_info_for, shard_state_dict, tp_partition_info,
                                        validate_tensor_parallel)
from megaloop.parallel.random import RNGTracker, check_rng_in_step, set_parallel_seed

__all__ = ["ParallelLayoutError", "ParallelState", "build_parallel_state", "default_backend", "grid_dims",
           "CollectiveCounter", "TPComm", "TensorParallelError", "apply_tensor_parallel",
           "check_replicated_parameters", "install_tp_grad_hooks", "gather_full_grads", "gather_full_state_dict",
           "gather_logits", "merge_tp_shards", "partition_info_for", "shard_state_dict", "tp_partition_info",
           "validate_tensor_parallel", "RNGTracker", "check_rng_in_step", "set_parallel_seed"]
