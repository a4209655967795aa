"""The DeepSpeed config, built from megaloop's one YAML config (never written by hand).

`check_supported` refuses, at startup and with a message that says what works, what depends on the
launch rather than on the config: the world size and the accelerator's precisions. Every check on the
config alone (ZeRO with PP or TP, activation partitioning, ...) is in `megaloop.config.validate`.
"""
from __future__ import annotations

from megaloop.config import Config, ConfigError


def check_supported(cfg: Config, world_size: int, device_name: str, fp16_supported: bool = True,
                    bf16_supported: bool = True) -> None:
    p, t = cfg.parallel, cfg.train
    tp, pp = p.tensor_parallel, p.pipeline_parallel
    if world_size % (tp * pp):
        raise ConfigError(f"world size {world_size} is not divisible by parallel.tensor_parallel={tp} x "
                          f"parallel.pipeline_parallel={pp}; launch a multiple of {tp * pp} ranks")
    if t.precision == "fp16" and not fp16_supported:
        raise ConfigError(f"train.precision='fp16' is not supported by the {device_name} accelerator; "
                          f"use fp32 (or bf16 where supported)")
    if t.precision == "bf16" and not bf16_supported:
        raise ConfigError(f"train.precision='bf16' is not supported by the {device_name} accelerator; use fp32")


def build_ds_config(cfg: Config, dp_world_size: int, clip_in_engine: bool = True) -> dict:
    """clip_in_engine: let DeepSpeed clip gradients (it then also reports the pre-clip norm). For the
    plain fp32 / ZeRO-0 path DeepSpeed clips without recording the norm, so the trainer clips itself
    (an optimizer pre-step hook) and passes clip_in_engine=False."""
    t, p = cfg.train, cfg.parallel
    ds = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum_steps,
        "train_batch_size": t.micro_batch_size * t.grad_accum_steps * dp_world_size,
        "gradient_clipping": float(t.grad_clip) if clip_in_engine else 0.0,
        "steps_per_print": 2 ** 31 - 1,  # megaloop logs itself
        "wall_clock_breakdown": False,
        "dump_state": False,
        "zero_allow_untested_optimizer": True,  # torch.optim.AdamW passed as an object
        "zero_optimization": {
            "stage": p.zero_stage,
            "contiguous_gradients": True,
            "overlap_comm": False,
            "reduce_scatter": True,
            "reduce_bucket_size": 50_000_000,
            "allgather_bucket_size": 50_000_000,
        },
        # bf16: DeepSpeed's bf16 engine (bf16 weights, fp32 master copy) or torch.autocast over fp32
        # weights (train.bf16_impl); the latter is the plain-PyTorch recipe, without the master-copy traffic
        "bf16": {"enabled": t.precision == "bf16" and t.bf16_impl == "master_weights"},
        "torch_autocast": {"enabled": t.precision == "bf16" and t.bf16_impl == "autocast", "dtype": "bfloat16"},
        "fp16": {
            "enabled": t.precision == "fp16",
            "loss_scale": float(t.loss_scale),  # 0 = dynamic
            "initial_scale_power": t.initial_scale_power,
            "loss_scale_window": 1000,
            "hysteresis": 2,
            "min_loss_scale": 1,
        },
        "activation_checkpointing": {
            "partition_activations": bool(t.partition_activations),
            "cpu_checkpointing": bool(t.cpu_checkpointing),
            "contiguous_memory_optimization": False,
            "synchronize_checkpoint_boundary": False,
            "profile": False,
        },
        "checkpoint": {"tag_validation": "Fail"},
    }
    if p.pipeline_parallel > 1:
        # The looped block checkpoints per loop inside its layer; DeepSpeed's whole-layer interval
        # checkpointing would recompute all R loops at once (memory grows with R), so it stays off.
        # Activation partitioning across TP ranks assumes one grad-carrying tensor per boundary; the
        # looped model sends (e, loop-count) and, with per-loop losses, more - so it is off too.
        ds["pipeline"] = {"pipe_partitioned": False, "grad_partitioned": False,
                          "activation_checkpoint_interval": 0}
        if t.precision == "bf16" and t.bf16_impl == "master_weights":
            ds["data_types"] = {"grad_accum_dtype": "fp32"}  # needed with PP + ZeRO 1 + bf16
    return ds
