"""AdamW (or Muon + AdamW) with weight-decay groups, and the learning-rate schedules (warmup + cosine,
warmup-stable-decay).

No weight decay for: 1-D parameters (norm scales, biases, per-channel vectors), anything named *bias,
and every parameter the model marks with `p.no_weight_decay = True` (Parcae's A_log, dt_bias, B, W_C;
LT2's rho). torch.optim.AdamW (fused on GPUs, see `optimizer_kernel`) runs everywhere and is handed to
deepspeed.initialize as an optimizer object (ZeRO accepts it with `zero_allow_untested_optimizer`).

train.optimizer=muon (the optimizer of the FLT reference's nanochat and of modded-nanogpt): the weight
matrices of the layers (`muon_parameter`) take torch.optim.Muon, i.e. Nesterov momentum orthogonalised by
Newton-Schulz iterations, the step scaled by sqrt(max(1, rows / cols)), at train.muon_lr with
train.muon_momentum; embeddings, the output head and every 1-D parameter stay on AdamW at train.lr. Both
follow the same schedule (each group's own peak times lr_at / train.lr). Validation keeps it to the layouts
where megaloop owns the step (ZeRO 0, fp32 weights) and every matrix is whole on its rank (TP 1):
orthogonalising TP shards separately is another optimizer."""
from __future__ import annotations

import math
from types import SimpleNamespace

import torch

from megaloop.config import TrainConfig
from megaloop.model.weight_decay import is_no_decay  # noqa: F401  (the rule; also imported from here by tests)


def muon_parameter(name: str, p: torch.nn.Parameter) -> bool:
    """Whether train.optimizer=muon gives this parameter Muon: a weight matrix of a layer (2-D, both sides
    > 1). Embeddings (token, value embeddings), the output head, one-row maps (Ouro's exit gate) and
    everything 1-D or marked no-decay stay on AdamW, as in the Muon references (they are lookups or
    read-outs, not maps between hidden states)."""
    owner = name.split(".")[-2] if "." in name else ""
    return p.dim() == 2 and min(p.shape) > 1 and not is_no_decay(name, p) and "embed" not in name and owner != "head"


def param_groups(model: torch.nn.Module, weight_decay: float, held=(), hold_steps: int = 0,
                 muon: bool = False) -> list:
    """AdamW groups: decay / no decay; with `held` (parameter names) and hold_steps > 0, those parameters go
    into groups of their own whose learning rate is 0 for the first hold_steps steps (train.trainable).
    With `muon`, the Muon matrices (`muon_parameter`) form groups of their own first, named "muon"."""
    buckets, seen = {}, set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        kind = ("muon" if muon and muon_parameter(name, p) else "no_decay" if is_no_decay(name, p) else "decay")
        key = (kind, hold_steps if name in held else 0)
        buckets.setdefault(key, []).append(p)
    groups = []
    for kind in ("muon", "decay", "no_decay"):
        for hold in sorted({h for k, h in buckets if k == kind}):
            group = {"params": buckets[(kind, hold)], "weight_decay": weight_decay if kind != "no_decay" else 0.0,
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
    muon = t.optimizer == "muon"
    groups = param_groups(model, t.weight_decay, held, hold_steps, muon=muon)
    for g in groups:
        kind = g.pop("name")
        g["decay"] = kind != "no_decay"  # (kept in the state: apply_schedule finds the decay groups)
        if muon:
            g["use_muon"] = kind == "muon"
    kernel = optimizer_kernel(t.optimizer_impl, device_type)
    flags = {"fused": {"fused": True}, "foreach": {"foreach": True}, "for_loop": {"foreach": False}}[kernel]
    if muon:
        return MuonAdamW(groups, t, flags)
    return torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), eps=t.eps, **flags)


class MuonAdamW(torch.optim.Optimizer):
    """One optimizer object (what DeepSpeed and the checkpoints see) over torch.optim.Muon for the groups
    marked `use_muon` and torch.optim.AdamW for the others. The two inner optimizers share this one's
    group dicts and state, so the LR scheduler, `apply_schedule`, the pre-step hooks (megaloop's clip and
    non-finite skip: a parameter without a gradient is left untouched by both) and state_dict act on all."""

    def __init__(self, groups: list, t: TrainConfig, adamw_flags: dict):
        for g in groups:
            g.setdefault("lr", t.muon_lr if g["use_muon"] else t.lr)
            if g["use_muon"]:
                g.setdefault("momentum", t.muon_momentum)
        super().__init__(groups, {})
        self._muon_kwargs = {"lr": t.muon_lr, "momentum": t.muon_momentum, "nesterov": True,
                             "adjust_lr_fn": "original", "weight_decay": t.weight_decay}
        self._adamw_kwargs = {"lr": t.lr, "betas": (t.beta1, t.beta2), "eps": t.eps, **adamw_flags}
        self._link()

    def _link(self) -> None:
        """(Re)build the inner optimizers on this one's current group dicts and state."""
        muon = [g for g in self.param_groups if g["use_muon"]]
        adamw = [g for g in self.param_groups if not g["use_muon"]]
        self.muon = torch.optim.Muon([dict(g) for g in muon], **self._muon_kwargs) if muon else None
        self.adamw = torch.optim.AdamW([dict(g) for g in adamw], **self._adamw_kwargs) if adamw else None
        for inner, mine in ((self.muon, muon), (self.adamw, adamw)):
            if inner is not None:
                for theirs, g in zip(inner.param_groups, mine):  # their defaults (nesterov, amsgrad, ...)
                    for k, v in theirs.items():
                        g.setdefault(k, v)
                inner.param_groups = mine  # the same dicts: lr / betas / weight decay set here reach them
                inner.state = self.state

    def load_state_dict(self, state_dict) -> None:
        super().load_state_dict(state_dict)  # (new group dicts and state: link the inner optimizers again)
        self._link()

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for inner in (self.muon, self.adamw):
            if inner is not None:
                inner.step()
        return loss


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
        sched.base_lrs = [peak_lr(g, t) for g in opt.param_groups]
        for group, lr in zip(opt.param_groups, sched.get_lr()):
            group["lr"] = lr
        sched._last_lr = [g["lr"] for g in opt.param_groups]
    for group in opt.param_groups:
        if group.get("use_muon"):
            group["momentum"] = t.muon_momentum
        else:
            group["betas"] = (t.beta1, t.beta2)
            group["eps"] = t.eps
        if group.get("decay", group.get("weight_decay", 0.0) != 0.0):  # the decay groups; the other stays 0
            group["weight_decay"] = t.weight_decay


def logged_lr(lrs: list, optimizer, t: TrainConfig) -> float:
    """The learning rate the logs show, on train.lr's scale: the first AdamW group's (with Muon, group 0 may
    be a Muon group at train.muon_lr's scale; then its lr scaled back)."""
    groups = getattr(optimizer, "param_groups", None) or []
    for lr, g in zip(lrs, groups):
        if not g.get("use_muon"):
            return lr
    return lrs[0] * t.lr / t.muon_lr if groups and groups[0].get("use_muon") else lrs[0]


def peak_lr(group: dict, t: TrainConfig) -> float:
    """The learning rate the schedule scales for this group: train.muon_lr for Muon's, train.lr otherwise."""
    return t.muon_lr if group.get("use_muon") else t.lr
