"""Building a rank's part of the model without the whole model: the meta-device build, materialised.

Each rank builds the LoopedLM on the meta device (shapes, no storage), applies tensor parallelism and takes
its pipeline stage's layers from it, and only then gives the parameters it holds their values: each one
drawn at its full shape on the host (megaloop/model/initial_values.py) or read from the state a run starts
from (init.from, memory-mapped), cut to the rank's TP shard and moved to the device. Host memory per rank is
its own shard plus one buffer of the largest parameter's size (the full values are drawn into it, one after
another), not the whole model; the weights are exactly those of the same model built whole in one process
and then sharded.

The parameters are swapped in place (torch.utils.swap_tensors): every module sharing one (a tied head) keeps
seeing the same object, with the attributes tensor parallelism tagged it with and its TP gradient hooks.
"""
from __future__ import annotations

from typing import Iterable, Mapping, Optional

import torch
import torch.nn as nn

from megaloop.checkpoint.lazy_state_dict import LazyStateDict
from megaloop.parallel.tensor_parallel import partition_of, shard_of


def meta_reference(lm: nn.Module) -> nn.Module:
    """An unsharded meta-device copy of `lm`'s architecture with its init seed: what the initial-value
    rules read (module kinds and marks, full shapes) after tensor parallelism has replaced lm's modules."""
    from megaloop.model.looped_lm import LoopedLM

    with torch.device("meta"):
        ref = LoopedLM(lm.cfg, loss=lm.loss_mode, exit_entropy_weight=lm.exit_entropy_weight)
    ref.init_seed = lm.init_seed
    return ref


class Materializer:
    """Gives the meta parameters of a (possibly tensor-parallel) LoopedLM `lm` their values on `device`.

    source: None (fresh initial values, drawn when a parameter is materialised), or a mapping name -> full
    tensor of the one-process LoopedLM's state dict (init.from; read per parameter, so a memory-mapped state
    is read only where this rank needs it).
    """

    def __init__(self, lm: nn.Module, device, source: Optional[Mapping[str, torch.Tensor]] = None):
        self.lm, self.device, self._source = lm, torch.device(device), source
        comm = getattr(lm, "tp_comm", None)
        self.tp_rank, self.tp = (comm.rank, comm.size) if comm is not None else (0, 1)
        self._names = {}
        for name, p in lm.named_parameters():  # (first name wins: a tied head is "embedding.weight")
            self._names.setdefault(id(p), name)

    def full_value(self, name: str) -> torch.Tensor:
        if self._source is None:  # (each value is copied out before the next is drawn: one reused buffer)
            self._source = InitialStateDict(meta_reference(self.lm), reuse_buffer=True)
        if name not in self._source:
            raise KeyError(f"the initial state has no {name!r}")
        return self._source[name]

    @torch.no_grad()
    def materialize(self, params: Iterable[nn.Parameter]) -> int:
        """Materialise these parameters of lm (those still on the meta device); returns how many."""
        n = 0
        for p in params:
            if not p.is_meta:
                continue
            name = self._names.get(id(p))
            if name is None:
                raise RuntimeError(f"a meta parameter of shape {tuple(p.shape)} is not one of the model's")
            local = shard_of(self.full_value(name), partition_of(p), self.tp_rank, self.tp)
            if tuple(local.shape) != tuple(p.shape):
                raise RuntimeError(f"{name}: the value's shard has shape {tuple(local.shape)}, the parameter "
                                   f"{tuple(p.shape)} (tensor-parallel rank {self.tp_rank} of {self.tp})")
            value = torch.empty(p.shape, dtype=p.dtype, device=self.device)
            value.copy_(local)
            _swap_in(p, value)
            n += 1
        return n

    def materialize_module(self, module: nn.Module) -> int:
        return self.materialize(module.parameters())


class InitialStateDict(LazyStateDict):
    """The state dict of `ref` (an unsharded LoopedLM, meta device) filled with its initial values, each drawn
    when asked for (what init.convert_mixers' conversion takes as the run's own init). reuse_buffer: weight
    matrices are drawn into one buffer of the largest parameter's size, so a value read is valid only until
    the next read (the materialiser copies each one out at once; without it, values drawn and freed one after
    another fragment the heap between the shards kept)."""

    def __init__(self, ref: nn.Module, reuse_buffer: bool = False):
        super().__init__()
        self._ref = ref
        self._scratch = torch.empty(max(p.numel() for p in ref.parameters())) if reuse_buffer else None
        self._params, first = {}, {}
        for name, t in ref.state_dict(keep_vars=True).items():
            if id(t) in first:  # a tied head: the embedding's parameter under a second name
                self.alias(name, first[id(t)])
            else:
                first[id(t)] = name
                self._params[name] = tuple(t.shape)

    def _names(self):
        return list(self._params)

    def _shape(self, key):
        return self._params[key]

    def _read(self, key):
        from megaloop.model.initial_values import initial_value
        return initial_value(self._ref, key, self._scratch)


def _swap_in(p: nn.Parameter, value: torch.Tensor) -> None:
    """p (same Python object) now holds `value`, with its attributes and gradient hooks: swap_tensors keeps
    the hooks' Python dicts but not the hooks autograd runs, so they are registered again."""
    attrs = dict(p.__dict__)
    hooks = list((p._backward_hooks or {}).values())
    post_hooks = list((getattr(p, "_post_accumulate_grad_hooks", None) or {}).values())
    torch.utils.swap_tensors(p, nn.Parameter(value, requires_grad=p.requires_grad))
    p.__dict__.update(attrs)
    p._backward_hooks = None
    for hook in hooks:
        p.register_hook(hook)
    if post_hooks:
        p._post_accumulate_grad_hooks = None
        for hook in post_hooks:
            p.register_post_accumulate_grad_hook(hook)


def materialize_all(lm: nn.Module, device, source: Optional[Mapping[str, torch.Tensor]] = None) -> int:
    return Materializer(lm, device, source).materialize(lm.parameters())

