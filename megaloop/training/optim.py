"""AdamW with weight-decay groups, and the learning-rate schedules (warmup + cosine, warmup-stable-decay).

No weight decay for: 1-D parameters (norm scales, biases, per-channel vectors), anything named *bias,
and every parameter the model marks with `p.no_weight_decay = True` (Parcae's A_log, dt_bias, B, W_C;
LT2's rho). torch.optim.AdamW (fused on GPUs, see `optimizer_kernel`) runs everywhere and is handed to
deepspeed.initialize as an optimizer object (ZeRO accepts it with `zero_allow_untested_optimizer`)."""
from __future__ import annotations

import math
from types import SimpleNamespace

import torch

from megaloop.config import TrainConfig
from megaloop.model.weight_decay import is_no_decay  # noqa: F401  (the rule; also imported from here by tests)


def param_groups(model: torch.nn.Module, weight_decay: float, held=(), hold_steps: int = 0) -> list:
    """AdamW groups: decay / no decay; with `held` (parameter names) and hold_steps > 0, those parameters go
    into groups of their own whose learning rate is 0 for the first hold_steps steps (train.trainable)."""
    buckets, seen = {}, set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        key = ("no_decay" if is_no_decay(name, p) else "decay", hold_steps if name in held else 0)
        buckets.setdefault(key, []).append(p)
    groups = []
    for kind in ("decay", "no_decay"):
        for hold in sorted({h for k, h in buckets if k == kind}):
            group = {"params": buckets[(kind, hold)], "weight_decay": weight_decay if kind == "decay" else 0.0,
                     "name": kind}
            if hold:
                group["hold_steps"] = hold
            groups.append(group)
    return groups


def optimizer_kernel(impl: str, device_type: str) -> str:
    """The AdamW kernel for train.optimizer_impl on this accelerator: 'auto' is torch's fused kernel
    (one launch for all parameters) on CUDA / XPU, where DeepSpeed's own FusedAdam would need a compiled
    op and gains nothing over it, and the multi-tensor foreach path elsewhere."""
    if impl != "auto":
        return impl
    return "fused" if device_type in ("cuda", "xpu") else "foreach"


def build_optimizer(model: torch.nn.Module, t: TrainConfig, device_type: str = "cpu", held=(),
                    hold_steps: int = 0) -> torch.optim.Optimizer:
    groups = param_groups(model, t.weight_decay, held, hold_steps)
    for g in groups:
        g["decay"] = g.pop("name") == "decay"  # (kept in the state: apply_schedule finds the decay group)
    kernel = optimizer_kernel(t.optimizer_impl, device_type)
    flags = {"fused": {"fused": True}, "foreach": {"foreach": True}, "for_loop": {"foreach": False}}[kernel]
    return torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), eps=t.eps, **flags)


def lr_at(step: int, t: TrainConfig) -> float:
    """Learning rate for optimizer step `step` (0-based)."""
    if t.warmup_steps > 0 and step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    if t.lr_schedule == "constant":
        return t.lr
    total = max(1, t.steps - t.warmup_steps)
    done = min(step - t.warmup_steps, total)
    if t.lr_schedule == "cosine":
        return t.min_lr + (t.lr - t.min_lr) * 0.5 * (1.0 + math.cos(math.pi * done / total))
    # wsd: warmup, stable at lr, then a linear decay to min_lr over the last wsd_decay_fraction of steps.
    decay_steps = max(1, int(round(t.wsd_decay_fraction * t.steps)))
    decay_start = t.steps - decay_steps
    if step < decay_start:
        return t.lr
    frac = min(1.0, (step - decay_start + 1) / decay_steps)
    return t.lr + (t.min_lr - t.lr) * frac


class _Multiplier:
    """Picklable lr_lambda (LambdaLR keeps callable objects in its state_dict)."""

    _KEYS = ("lr", "min_lr", "warmup_steps", "lr_schedule", "steps", "wsd_decay_fraction")

    def __init__(self, t: TrainConfig, hold_steps: int = 0):
        # primitives only, so the scheduler state loads under torch.load(weights_only=True)
        self.params = {k: getattr(t, k) for k in self._KEYS}
        self.params["hold_steps"] = int(hold_steps)  # lr 0 before this step (train.trainable=converted)

    def __call__(self, step: int) -> float:
        t = SimpleNamespace(**self.params)
        if step < getattr(t, "hold_steps", 0):
            return 0.0
        return lr_at(step, t) / t.lr


def build_scheduler(optimizer: torch.optim.Optimizer, t: TrainConfig):
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, [_Multiplier(t, g.get("hold_steps", 0)) for g in optimizer.param_groups])


def apply_schedule(engine, t: TrainConfig) -> None:
    """After a resume: the learning-rate schedule and AdamW's hyper-parameters of the config given now,
    not the ones restored with the checkpoint (LambdaLR keeps its multiplier's parameters in its state,
    the optimizer its betas / eps / weight decay). The LR of the resumed step is recomputed at once."""
    sched, opt = engine.lr_scheduler, engine.optimizer
    if sched is not None:
        for lam in sched.lr_lambdas:
            if isinstance(lam, _Multiplier):
                lam.params = _Multiplier(t, lam.params.get("hold_steps", 0)).params
        sched.base_lrs = [t.lr for _ in sched.base_lrs]
        for group, lr in zip(opt.param_groups, sched.get_lr()):
            group["lr"] = lr
        sched._last_lr = [g["lr"] for g in opt.param_groups]
    for group in opt.param_groups:
        group["betas"] = (t.beta1, t.beta2)
        group["eps"] = t.eps
        if group.get("decay", group.get("weight_decay", 0.0) != 0.0):  # the decay group; the other stays 0
            group["weight_decay"] = t.weight_decay
