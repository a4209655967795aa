"""The cluster planner (issue 16): exact per-(pipeline stage, TP rank) parameter counts from meta-device
modules, weight / gradient / optimizer memory by precision and ZeRO stage, activation memory per
micro-batch and in flight (activations.py), TP communication (comm.py), model FLOPs per stage, step
time at a stated MFU, and the layout search (search.py). `tools/plan.py` is its command line."""
from megaloop.planner.activations import activation_bytes, stage_names
from megaloop.planner.comm import stage_tp_comm
from megaloop.planner.memory import MemoryBytes, state_bytes
from megaloop.planner.params import StageParams, meta_model, stage_params, stage_parts, total_params
from megaloop.planner.plan import GPUS, GPU, format_plan, make_plan, parse_gpu
from megaloop.planner.search import format_search, search

__all__ = ["GPU", "GPUS", "MemoryBytes", "StageParams", "activation_bytes", "format_plan", "format_search",
           "make_plan", "meta_model", "parse_gpu", "search", "stage_names", "stage_params", "stage_parts",
           "stage_tp_comm", "state_bytes", "total_params"]
