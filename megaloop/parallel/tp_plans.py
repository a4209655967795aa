"""Per-module tensor-parallel plans: how each sub-layer of a transformer layer is sharded in place.

A plan is `fn(module, comm, cfg, ctx)`; it swaps the module's linear maps for column/row-parallel ones
(keeping this rank's heads / hidden units), tags the parameters it shards or that get partial gradients
(`Partition`), and installs Megatron's `f` at the module's entry: one forward pre-hook that passes the
sub-layer's tensor inputs through ONE collective (`copy_to_tp`; under sequence parallelism one
all-gather of the sequence). `ctx` is shared by all plans of one `apply_tensor_parallel` call:
{"sp": sequence parallel, "tracker": the model-parallel RNGTracker, "full_sequence": ids of replicated
parameters that see the gathered sequence}.

Mixers are pluggable: a new mixer class registers its plan with `@register_tp_plan(MyMixer)` (the plan
of the nearest registered base class is used otherwise, e.g. SlidingWindowAttention uses Attention's).
The partition convention the plans follow is documented in megaloop/parallel/apply_tp.py.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional

import torch
import torch.nn as nn

from megaloop.model.gated_deltanet import GatedDeltaNet
from megaloop.model.layers import MLP, Attention
from megaloop.model.sparse_attention import DeepSeekSparseAttention
from megaloop.parallel.comm import TPComm, copy_to_tp, gather_from_sp
from megaloop.parallel.random import RNGTracker
from megaloop.parallel.tensor_parallel import ColumnParallelLinear, Partition, RowParallelLinear, tag
from megaloop.errors import MegaloopError


class TensorParallelError(MegaloopError, ValueError):
    """The model cannot be split over this many TP ranks; the message names the numbers."""


TP_PLANS: Dict[type, Callable] = {}


def register_tp_plan(cls: type):
    """Decorator: `fn(module, comm, cfg, ctx)` shards a module of class `cls` (and its subclasses)."""
    def wrap(fn):
        TP_PLANS[cls] = fn
        return fn
    return wrap


def plan_for(module: nn.Module) -> Optional[Callable]:
    for klass in type(module).__mro__:
        if klass in TP_PLANS:
            return TP_PLANS[klass]
    return None


# ---------------------------------------------------------------------------------------------
# Helpers


def _shard_param(module: nn.Module, name: str, dim: int, index: slice, partition: Partition) -> None:
    old = getattr(module, name)
    new = nn.Parameter(old.data.narrow(dim, index.start, index.stop - index.start).detach().clone(),
                       requires_grad=old.requires_grad)
    for attr in ("no_weight_decay", "zero_init", "identity_init"):
        if hasattr(old, attr):
            setattr(new, attr, getattr(old, attr))
    setattr(module, name, tag(new, partition))


def _block(rank: int, n: int, size: int) -> slice:
    return slice(rank * n * size, (rank + 1) * n * size)


# The tensor inputs of a sharded sub-layer, as (keyword, position) in the mixer call
# `mixer(x, rope, q_input=None)` (an MLP has x only): x and, for FLT's attention injection, q_input.
_ENTRY_INPUTS = (("x", 0), ("q_input", 2))


def _entry_hook(transform: Callable[[List[torch.Tensor]], List[torch.Tensor]]):
    """Forward pre-hook (with kwargs) that replaces the sub-layer's tensor inputs, all in one call of
    `transform` (so that one collective serves them all)."""

    def pre_hook(mod, args, kwargs):
        args = list(args)
        slots = []  # (where, key) of the tensor inputs
        for key, pos in _ENTRY_INPUTS:
            if pos < len(args):
                if torch.is_tensor(args[pos]):
                    slots.append(("a", pos))
            elif torch.is_tensor(kwargs.get(key)):
                slots.append(("k", key))
        xs = [args[k] if w == "a" else kwargs[k] for w, k in slots]
        for (w, k), y in zip(slots, transform(xs) if xs else []):
            if w == "a":
                args[k] = y
            else:
                kwargs[k] = y
        return tuple(args), kwargs
    return pre_hook


def _copy_in(comm: TPComm):
    """Megatron's f: identity forward, ONE all-reduce of all the input gradients backward."""
    def transform(xs):
        ys = copy_to_tp(comm, *xs)
        return list(ys) if len(xs) > 1 else [ys]
    return transform


def _gather_sequence_in(comm: TPComm):
    """Sequence parallelism's f: the inputs arrive as sequence shards (B, T/tp, d) and leave gathered
    (B, T, d), in ONE all-gather forward (the streams concatenated along the features) and ONE
    reduce-scatter backward."""
    def transform(xs):
        if len(xs) == 1:
            return [gather_from_sp(comm, xs[0], dim=1)]
        sizes = [t.shape[-1] for t in xs]
        return list(gather_from_sp(comm, torch.cat(xs, dim=-1), dim=1).split(sizes, dim=-1))
    return transform


def _install_entry(module: nn.Module, comm: TPComm, ctx: dict, fork: bool = False) -> None:
    """f at the entry of a sharded sub-layer (all-gather of the sequence under SP). With `fork`, the
    sub-layer then runs on the model-parallel RNG stream (dropout inside sharded heads differs across
    TP ranks); registered after the entry hook, so the collective itself is not on the forked stream."""
    transform = _gather_sequence_in(comm) if ctx["sp"] else _copy_in(comm)
    module.register_forward_pre_hook(_entry_hook(transform), with_kwargs=True)
    if fork:
        fork_rng(module, ctx["tracker"])


def fork_rng(module: nn.Module, tracker: RNGTracker) -> None:
    """Run `module` on the model-parallel RNG stream (dropout in sharded heads, or on sequence shards:
    each rank its own mask, as Megatron's)."""
    def pre_hook(mod, args):
        c = tracker.fork()
        c.__enter__()
        mod._tp_rng_ctx = c

    def post_hook(mod, args, output):
        c = mod.__dict__.pop("_tp_rng_ctx", None)
        if c is not None:
            c.__exit__(None, None, None)
        return output
    module.register_forward_pre_hook(pre_hook)
    module.register_forward_hook(post_hook, always_call=True)


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale: float):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g * ctx.scale, None

    @staticmethod
    def jvp(ctx, t, _):  # forward-mode AD: the identity
        return t.view_as(t)


def _replicated_branch(module: nn.Module, tp: int) -> None:
    """A replicated module fed from inside a sharded region (after f): every rank computes the same
    input gradient, which f's all-reduce would then count tp times. Scale it by 1/tp on the way in."""
    def pre_hook(mod, args):
        return tuple(_ScaleGrad.apply(a, 1.0 / tp) if torch.is_tensor(a) and a.requires_grad else a for a in args)
    module.register_forward_pre_hook(pre_hook)


# ---------------------------------------------------------------------------------------------
# The built-in plans


@register_tp_plan(Attention)  # also SlidingWindowAttention (a subclass)
def shard_attention(attn: nn.Module, comm: TPComm, cfg, ctx: dict) -> None:
    tp, r = comm.size, comm.rank
    hd = attn.head_dim
    H, KV = attn.wq.out_features // hd, attn.wk.out_features // hd
    if H % tp:
        raise TensorParallelError(f"attention has {H} heads, not divisible by tensor_parallel={tp}")
    nq = H // tp
    q_rows = _block(r, nq, hd)
    attn.wq = ColumnParallelLinear.from_linear(attn.wq, comm, q_rows, copy_input=False)
    if attn.gate is not None:
        attn.gate = ColumnParallelLinear.from_linear(attn.gate, comm, q_rows, copy_input=False)
    if KV % tp == 0:
        kv_rows, part = _block(r, KV // tp, hd), Partition(0, "column", KV * hd)
    elif tp % KV == 0:
        replicas = tp // KV
        kv_rows, part = _block(r // replicas, 1, hd), Partition(0, "kv_replicated", KV * hd, replicas)
    else:
        raise TensorParallelError(f"attention has {KV} kv heads and tensor_parallel={tp}: one must divide the other")
    attn.wk = ColumnParallelLinear.from_linear(attn.wk, comm, kv_rows, partition=part, copy_input=False)
    attn.wv = ColumnParallelLinear.from_linear(attn.wv, comm, kv_rows, partition=part, copy_input=False)
    attn.wo = RowParallelLinear.from_linear(attn.wo, comm, q_rows, sequence_parallel=ctx["sp"])
    for norm in (attn.q_norm, attn.k_norm):
        if norm is not None and norm.weight is not None:
            tag(norm.weight, Partition(None, "replicated_partial_grad"))
    dropout = getattr(attn, "dropout", 0.0)
    _install_entry(attn, comm, ctx, fork=isinstance(dropout, float) and dropout > 0)


@register_tp_plan(GatedDeltaNet)
def shard_gdn(gdn: nn.Module, comm: TPComm, cfg, ctx: dict) -> None:
    tp, r = comm.size, comm.rank
    H = gdn.w_a.out_features
    dk, dv = gdn.head_k_dim, gdn.head_v_dim
    if H % tp:
        raise TensorParallelError(f"Gated DeltaNet has {H} heads, not divisible by tensor_parallel={tp}")
    h = H // tp
    for name, size in (("wq", dk), ("wk", dk), ("wv", dv), ("w_gate", dv), ("w_a", 1), ("w_b", 1)):
        setattr(gdn, name, ColumnParallelLinear.from_linear(getattr(gdn, name), comm, _block(r, h, size),
                                                            copy_input=False))
    for name, size in (("q_conv", dk), ("k_conv", dk), ("v_conv", dv), ("A_log", 1), ("dt_bias", 1)):
        _shard_param(gdn, name, 0, _block(r, h, size), Partition(0, "column", H * size))
    tag(gdn.out_norm_weight, Partition(None, "replicated_partial_grad"))
    gdn.wo = RowParallelLinear.from_linear(gdn.wo, comm, _block(r, h, dv), sequence_parallel=ctx["sp"])
    _install_entry(gdn, comm, ctx)


@register_tp_plan(DeepSeekSparseAttention)
def shard_dsa(attn: nn.Module, comm: TPComm, cfg, ctx: dict) -> None:
    # The indexer is replicated (every rank must select the same keys) and fed from inside the
    # sharded region; its aux loss target averages the attention distribution over ALL heads.
    shard_attention(attn, comm, cfg, ctx)
    for lin in (attn.wq_index, attn.wk_index, attn.w_index):
        _replicated_branch(lin, comm.size)
        ctx["full_sequence"].update(id(p) for p in lin.parameters())  # sees the gathered sequence under SP
    if attn.k_index_norm is not None:  # (V3.2's LayerNorm on k_I: fed by wk_index, complete gradients too)
        ctx["full_sequence"].update(id(p) for p in attn.k_index_norm.parameters())
    attn.attend = _TPSparseAttend(attn, comm)


class _TPSparseAttend:
    """DeepSeekSparseAttention.attend under TP: the indexer's KL target is the head-average of the
    main attention distribution over all heads (one extra forward all-reduce of B*T*topk values per
    DSA layer and iteration, when the indexer trains; none at inference)."""

    def __init__(self, attn: nn.Module, comm: TPComm):
        self.attn, self.comm = attn, comm

    def __call__(self, q, k, v, x=None, q_input=None, docs=None):
        return self.attn.sparse_attend(q, k, v, x, q_input,
                                       head_reduce=lambda t: self.comm.all_reduce(t, phase="forward"),
                                       total_heads=q.shape[1] * self.comm.size, docs=docs)


@register_tp_plan(MLP)
def shard_mlp(mlp: nn.Module, comm: TPComm, cfg, ctx: dict) -> None:
    f = mlp.w1.out_features
    if f % comm.size:
        raise TensorParallelError(f"MLP hidden size {f} is not divisible by tensor_parallel={comm.size}")
    mlp.w1 = ColumnParallelLinear.from_linear(mlp.w1, comm, copy_input=False)
    if mlp.w3 is not None:
        mlp.w3 = ColumnParallelLinear.from_linear(mlp.w3, comm, copy_input=False)
    mlp.w2 = RowParallelLinear.from_linear(mlp.w2, comm, sequence_parallel=ctx["sp"])
    _install_entry(mlp, comm, ctx)
