"""The cluster planner (issue 16): exact per-(pipeline stage, TP rank) parameter counts from meta-device
modules, weight / gradient / optimizer memory by precision and ZeRO stage, model FLOPs per stage, step
time at a stated MFU. `tools/plan.py` is its command line."""
from megaloop.planner.memory import MemoryBytes, state_bytes
from megaloop.planner.params import StageParams, meta_model, stage_params, stage_parts, total_params
from megaloop.planner.plan import GPUS, GPU, format_plan, make_plan, parse_gpu

__all__ = ["GPU", "GPUS", "MemoryBytes", "StageParams", "format_plan", "make_plan", "meta_model", "parse_gpu",
           "stage_params", "stage_parts", "state_bytes", "total_params"]
