"""Resuming a training checkpoint on another TP x PP x DP x ZeRO layout (megaloop.training.trainer.resume).

Why not DeepSpeed's universal checkpoint: its per-parameter slicing knows DeepSpeed's TP patterns
(Megatron's), not megaloop's kv-replicated TP shards (wk / wv held by several TP ranks when
n_kv_heads < tp) nor the pipeline layer classes' LoopedLM names; megaloop's own reader already merges
any layout's weights with the same partition rules as training (megaloop.parallel.apply_tp). So:

1. training_state.TrainingStateReader maps the old checkpoint's files (memory-mapped) to the fp32 weights,
   AdamW exp_avg / exp_avg_sq and step of each parameter keyed by LoopedLM name (ZeRO 0: the torch
   optimizer's state_dict; ZeRO 1/2: the flat partitions of every data-parallel rank, cut by their names);
2. the engine built for the new layout takes, one parameter at a time, this rank's TP slice (read from
   only the old shards it overlaps; apply_tp's partition convention) of this stage's parameters: the
   module weights, and the optimizer state - ZeRO 0: `optimizer.state[p]`;
   ZeRO 1/2: the fp32 partition (deepspeed.utils.safe_set_full_fp32_param) and the flat exp_avg /
   exp_avg_sq of this rank's partition, assembled through each parameter's DeepSpeed hp mapping (the
   base optimizer's state is created lazily at the first step, so safe_set_full_optimizer_state has
   nothing to write into before it);
3. the LR scheduler's position, DeepSpeed's step / sample counters and the client state (step,
   consumed samples) come from the checkpoint; the data position carries over because the global
   batch is unchanged (resume_policy refuses otherwise). The RNG states saved per rank do not map to
   the new ranks: every rank re-seeds from (train.seed + step) with megaloop.parallel.random's rule.

Supported: ZeRO 0, 1, 2 on either side with fp32 weights, or bf16 under torch autocast with ZeRO 0
(`supported_change`); the rest is refused before loading (resume_policy).
"""
from __future__ import annotations

import random
from typing import Optional

import numpy as np
import torch

from megaloop.checkpoint.layout import CheckpointError


def layout_of(tp: int, pp: int, dp: int, zero: int) -> str:
    return f"tensor_parallel x pipeline_parallel x data_parallel = {tp} x {pp} x {dp}, ZeRO {zero}"


def _plain_optimizer(zero: int, precision: str, bf16_impl: str) -> bool:
    return zero == 0 and (precision == "fp32" or (precision == "bf16" and bf16_impl == "autocast"))


def supported_change(saved_cfg, cfg, then_zero: int, now_zero: int) -> Optional[str]:
    """None when a checkpoint of `saved_cfg` (ZeRO then_zero) can be loaded into a run of `cfg` (ZeRO
    now_zero) on another layout, else why not (one clause)."""
    for zero, c, when in ((then_zero, saved_cfg, "the checkpoint"), (now_zero, cfg, "this run")):
        t = c.train
        if getattr(t, "optimizer", "adamw") == "muon":
            return f"train.optimizer=muon ({when}): its momentum buffers are not carried across layouts"
        if zero == 3:
            return f"ZeRO 3 ({when}) keeps its parameters partitioned in a form this loader does not rebuild"
        if zero == 0 and not _plain_optimizer(zero, t.precision, t.bf16_impl):
            return (f"ZeRO 0 with precision {t.precision}" + (f" ({t.bf16_impl})" if t.precision == "bf16" else "")
                    + f" ({when}) keeps its optimizer in a DeepSpeed wrapper this loader does not rebuild")
        if zero in (1, 2) and t.precision == "fp16":
            return f"fp16 with ZeRO {zero} ({when}): the loss-scaler state is not carried over"
    return None


def _lm_params(module):
    """(LoopedLM name, parameter) of the engine's module (PipelineModule names mapped back)."""
    from megaloop.checkpoint.training_state import _lm_name
    seen = set()
    for n, p in module.named_parameters():
        if id(p) not in seen:
            seen.add(id(p))
            yield _lm_name(n), p


def load_training_any_layout(te, tag_dir, state, cfg) -> dict:
    """Load a checkpoint saved on another layout into this rank's engine (every rank calls it; no
    collectives). te: megaloop.training.engine.TrainingEngine. Returns the checkpoint's client state."""
    from deepspeed.runtime.base_optimizer import ZeROOptimizer
    from deepspeed.utils import safe_set_full_fp32_param
    from megaloop.checkpoint.training_state import TrainingStateReader
    from megaloop.parallel.apply_tp import partition_info_for
    from megaloop.parallel.random import set_parallel_seed

    ts = TrainingStateReader(tag_dir)
    engine, module = te.engine, te.engine.module
    tp, tp_rank = state.tp_size, state.tp_rank
    info = partition_info_for(cfg.model, tp) if tp > 1 else {}
    params = dict(_lm_params(module))
    missing = sorted(set(params) - set(ts.names))
    if missing:
        raise CheckpointError(f"{tag_dir} holds no optimizer state for {', '.join(missing[:6])}")
    opt = engine.optimizer
    step_t = float(ts.adam_step)
    zero = isinstance(opt, ZeROOptimizer)
    if zero:
        if not hasattr(opt, "single_partition_of_fp32_groups"):
            raise CheckpointError(f"resuming {tag_dir} on another layout: {type(opt).__name__} is not supported")
        flats = opt.single_partition_of_fp32_groups
        moments = [(torch.zeros_like(f), torch.zeros_like(f)) for f in flats]
        group_of = {id(p): i for i, group in enumerate(opt.bit16_groups) for p in group}
    elif not isinstance(opt, torch.optim.Optimizer):
        raise CheckpointError(f"resuming {tag_dir} on another layout: optimizer {type(opt).__name__} not supported")
    # One parameter at a time: its slice for this rank is read, put in place and dropped (host memory: the
    # rank's own state plus one parameter, whatever the old layout).
    with torch.no_grad():
        for n, p in params.items():
            w = ts.local(n, "fp32", info.get(n), tp_rank, tp)
            if tuple(w.shape) != tuple(p.shape):
                raise CheckpointError(f"{tag_dir}: {n} is {tuple(w.shape)} for tensor-parallel rank {tp_rank} of "
                                      f"{tp}, the engine holds {tuple(p.shape)}")
            p.data.copy_(w.to(p.device, p.dtype))
            if zero:
                safe_set_full_fp32_param(p, w.to(p.device, torch.float32))
            del w
            mapping = getattr(p, "_hp_mapping", None) if zero else None
            if zero and mapping is None:  # (no fragment of this parameter in this rank's ZeRO partition)
                continue
            m, v = (ts.local(n, k, info.get(n), tp_rank, tp) for k in ("exp_avg", "exp_avg_sq"))
            if not zero:
                opt.state[p] = {"step": _step_tensor(opt, p, step_t), "exp_avg": m.to(p.device, p.dtype),
                                "exp_avg_sq": v.to(p.device, p.dtype)}
                continue
            lp, hp = mapping.lp_fragment_address, mapping.hp_fragment_address
            avg, sq = moments[group_of[id(p)]]
            avg.narrow(0, hp.start, hp.numel).copy_(m.reshape(-1).narrow(0, lp.start, lp.numel))
            sq.narrow(0, hp.start, hp.numel).copy_(v.reshape(-1).narrow(0, lp.start, lp.numel))
    if zero:
        base = opt.optimizer
        for flat, (avg, sq) in zip(flats, moments):
            base.state[flat] = {"step": _step_tensor(base, flat, step_t), "exp_avg": avg, "exp_avg_sq": sq}
        if hasattr(opt, "_hp_optimizer_states_linked"):
            opt._hp_optimizer_states_linked = False  # re-linked lazily at the next step
    ts.close()

    es = ts.engine_state
    sched = engine.lr_scheduler
    saved_sched = es.get("lr_scheduler") or {}
    if sched is not None and "last_epoch" in saved_sched:
        sched.last_epoch = int(saved_sched["last_epoch"])
        sched._step_count = int(saved_sched.get("_step_count", sched.last_epoch + 1))
    engine.global_steps = int(es.get("global_steps", 0))
    engine.global_samples = int(es.get("global_samples", engine.global_steps * engine.train_batch_size()))
    engine.skipped_steps = int(es.get("skipped_steps", 0))

    client = {k: v for k, v in es.items() if k in ("step", "consumed_samples", "config", "tokenizer",
                                                    "loop_sampling", "megaloop_format")}
    # The per-rank RNG files belong to the old ranks: re-seed deterministically from (seed, step).
    seed = int(cfg.train.seed) + int(client.get("step") or 0)
    set_parallel_seed(seed, state)
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    return client


def _step_tensor(opt, p, step: float) -> torch.Tensor:
    group = next((g for g in opt.param_groups if any(q is p for q in g["params"])), opt.param_groups[0])
    if group.get("capturable") or group.get("fused"):
        return torch.tensor(step, dtype=torch.float32, device=p.device)
    return torch.tensor(step, dtype=torch.float32)


def load_training(te, tag_dir, state, cfg, rank: int) -> dict:
    """The trainer's resume: DeepSpeed's own load on the checkpoint's layout, this module's on another."""
    from megaloop.checkpoint.engine import load_training as same_layout
    from megaloop.checkpoint.reader import read_info
    from pathlib import Path
    ci = read_info(Path(tag_dir))
    if (ci.tp, ci.pp, ci.dp, ci.zero_stage) == (state.tp_size, state.pp_size, state.dp_size, cfg.parallel.zero_stage):
        return same_layout(te.engine, tag_dir, rank)
    return load_training_any_layout(te, tag_dir, state, cfg)
