"""Megatron-style tensor-parallel layers: column- and row-parallel linear, vocab-parallel embedding.

Each layer holds its shard of a full weight and tags its parameters with a `Partition` (attribute
`tp_partition`), so shards can be gathered back (`apply_tp.gather_full_state_dict`) or merged offline
from saved per-rank state dicts (`apply_tp.merge_tp_shards`).

  ColumnParallelLinear  y_local = x W_local^T      W split along dim 0 (output features)
                        input replicated (optionally passed through f = copy_to_tp here), output a
                        shard of the features, optionally all-gathered.
  RowParallelLinear     y = sum_r x_r W_r^T (+ b)  W split along dim 1 (input features)
                        input a shard of the features, output all-reduced (g) or, under sequence
                        parallelism, reduce-scattered along the sequence.
  VocabParallelEmbedding  rows [r*V/tp, (r+1)*V/tp) of the (padded) table on rank r; tokens outside
                        the range give zeros, then one all-reduce (g).

Layers are usually made from an already-initialised `nn.Linear`/`nn.Embedding` with `from_linear` /
`from_embedding`, which copy the right shard, so a TP model built from the same seed as a one-process
model computes the same function.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from megaloop.parallel.comm import (TPComm, copy_to_tp, gather_from_sp, gather_from_tp, reduce_from_tp,
                                    reduce_scatter_to_sp)


@dataclass(frozen=True)
class Partition:
    """How one parameter is laid out over the TP ranks.

    dim       the split dimension, or None for a replicated parameter (identical on every rank)
    kind      column | row | vocab | kv_replicated | replicated | replicated_partial_grad
    full      the full size along `dim`
    replicas  ranks holding the same shard (kv heads replicated when n_kv_heads < tp: rank r holds
              kv shard r // replicas); 1 otherwise
    The shard of rank r along `dim` is the contiguous block r // replicas of size
    full / (tp / replicas); merge by concatenating the shards of ranks 0, replicas, 2*replicas, ...
    `replicated_partial_grad`: replicated value, but each rank's gradient is a partial sum (a norm
    applied per head inside a sharded attention: QK-norm; under sequence parallelism, every replicated
    parameter applied to sequence shards) -> `apply_tp.install_tp_grad_hooks` sums it.
    """

    dim: Optional[int]
    kind: str
    full: int = 0
    replicas: int = 1

    @property
    def sharded(self) -> bool:
        return self.dim is not None


REPLICATED = Partition(None, "replicated")


def tag(param: nn.Parameter, partition: Partition) -> nn.Parameter:
    param.tp_partition = partition
    # Megatron's attribute names, for tools that look for them (DeepSpeed's grad-norm de-duplication).
    param.tensor_model_parallel = partition.sharded and partition.replicas == 1
    if partition.sharded:
        param.partition_dim = partition.dim
        param.partition_stride = 1
    return param


def partition_of(param: torch.Tensor) -> Partition:
    return getattr(param, "tp_partition", REPLICATED)


def shard_of(full: torch.Tensor, part: Partition, tp_rank: int, tp: int) -> torch.Tensor:
    """TP rank tp_rank's shard (a view) of a parameter's full value, as `part` lays it out over tp ranks."""
    if not part.sharded or tp == 1:
        return full
    size = full.shape[part.dim] // (tp // part.replicas)
    return full.narrow(part.dim, (tp_rank // part.replicas) * size, size)


IndexLike = Union[slice, Sequence[int], torch.Tensor]


def _take(t: torch.Tensor, dim: int, index: IndexLike) -> torch.Tensor:
    if isinstance(index, slice):
        return t.narrow(dim, index.start, index.stop - index.start).detach().clone()
    return t.index_select(dim, torch.as_tensor(index, dtype=torch.long, device=t.device)).detach().clone()


def _own_block(n_features: int, comm: TPComm, what: str) -> slice:
    """This rank's contiguous block when n_features are split evenly over the TP ranks."""
    if n_features % comm.size:
        raise ValueError(f"{what} features {n_features} not divisible by tensor parallel size {comm.size}")
    n = n_features // comm.size
    return slice(comm.rank * n, (comm.rank + 1) * n)


class ColumnParallelLinear(nn.Module):
    """y = x W^T + b with W (and b) split along the output features.

    copy_input:    apply f (identity forward, all-reduce of the input gradient backward) here. Set
                   False when one f already covers several column-parallel layers fed by the same
                   input (q, k, v, gate of one attention; w1, w3 of one MLP): one collective, not four.
    gather_output: all-gather the output features (rarely wanted: the consumer is usually a
                   row-parallel layer or the vocab-parallel loss).
    sequence_parallel: the input is a sequence shard; all-gather it along dim 1 first (replaces f).
    """

    def __init__(self, in_features: int, out_features_local: int, comm: TPComm, bias: bool = False,
                 copy_input: bool = True, gather_output: bool = False, sequence_parallel: bool = False,
                 weight: Optional[nn.Parameter] = None, partition: Optional[Partition] = None):
        super().__init__()
        self.comm = comm
        self.in_features, self.out_features = in_features, out_features_local
        self.copy_input, self.gather_output, self.sequence_parallel = copy_input, gather_output, sequence_parallel
        self.weight = weight if weight is not None else nn.Parameter(torch.empty(out_features_local, in_features))
        part = partition or Partition(0, "column", out_features_local * comm.size)
        tag(self.weight, part)
        self.bias = None
        if bias:
            self.bias = tag(nn.Parameter(torch.zeros(out_features_local)), part)

    @classmethod
    def from_linear(cls, linear: nn.Linear, comm: TPComm, rows: Optional[IndexLike] = None,
                    partition: Optional[Partition] = None, **kw) -> "ColumnParallelLinear":
        """Shard an initialised nn.Linear: keep output rows `rows` (default: this rank's contiguous
        block), copying the weight values."""
        out_f = linear.out_features
        rows = _own_block(out_f, comm, "output") if rows is None else rows
        w = _take(linear.weight.data, 0, rows)
        layer = cls(linear.in_features, w.shape[0], comm, bias=linear.bias is not None,
                    weight=nn.Parameter(w, requires_grad=linear.weight.requires_grad),
                    partition=partition or Partition(0, "column", out_f), **kw)
        if linear.bias is not None:
            layer.bias.data.copy_(_take(linear.bias.data, 0, rows))
        _copy_attrs(linear, layer)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.sequence_parallel:
            x = gather_from_sp(self.comm, x, dim=1)
        elif self.copy_input:
            x = copy_to_tp(self.comm, x)
        y = F.linear(x, self.weight, self.bias)
        if self.gather_output:
            y = gather_from_tp(self.comm, y, dim=-1)
        return y

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features_per_rank={self.out_features}, tp={self.comm.size}, "
                f"copy_input={self.copy_input}, gather_output={self.gather_output}, "
                f"sequence_parallel={self.sequence_parallel}")


class RowParallelLinear(nn.Module):
    """y = sum over ranks of x_r W_r^T, + b (replicated, added once after the reduction).

    The input is already split along the features (the output of a column-parallel layer).
    sequence_parallel: reduce-scatter the output along the sequence (dim 1) instead of all-reduce.
    """

    def __init__(self, in_features_local: int, out_features: int, comm: TPComm, bias: bool = False,
                 sequence_parallel: bool = False, weight: Optional[nn.Parameter] = None):
        super().__init__()
        self.comm = comm
        self.in_features, self.out_features = in_features_local, out_features
        self.sequence_parallel = sequence_parallel
        self.weight = weight if weight is not None else nn.Parameter(torch.empty(out_features, in_features_local))
        tag(self.weight, Partition(1, "row", in_features_local * comm.size))
        self.bias = tag(nn.Parameter(torch.zeros(out_features)), REPLICATED) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, comm: TPComm, cols: Optional[IndexLike] = None, **kw):
        cols = _own_block(linear.in_features, comm, "input") if cols is None else cols
        w = _take(linear.weight.data, 1, cols)
        layer = cls(w.shape[1], linear.out_features, comm, bias=linear.bias is not None,
                    weight=nn.Parameter(w, requires_grad=linear.weight.requires_grad), **kw)
        if linear.bias is not None:
            layer.bias.data.copy_(linear.bias.data)
        _copy_attrs(linear, layer)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight)
        y = reduce_scatter_to_sp(self.comm, y, dim=1) if self.sequence_parallel else reduce_from_tp(self.comm, y)
        if self.bias is not None:
            y = y + self.bias
        return y

    def extra_repr(self) -> str:
        return (f"in_features_per_rank={self.in_features}, out_features={self.out_features}, tp={self.comm.size}, "
                f"sequence_parallel={self.sequence_parallel}")


class VocabParallelEmbedding(nn.Module):
    """Embedding table split along the (padded) vocabulary; rank r holds rows [start, end)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, comm: TPComm,
                 weight: Optional[nn.Parameter] = None, sequence_parallel: bool = False):
        super().__init__()
        if num_embeddings % comm.size:
            raise ValueError(f"padded vocabulary {num_embeddings} not divisible by tensor parallel size {comm.size}")
        self.comm = comm
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.per_rank = num_embeddings // comm.size
        self.vocab_start = comm.rank * self.per_rank
        self.vocab_end = self.vocab_start + self.per_rank
        self.sequence_parallel = sequence_parallel
        self.weight = weight if weight is not None else nn.Parameter(torch.empty(self.per_rank, embedding_dim))
        tag(self.weight, Partition(0, "vocab", num_embeddings))

    @classmethod
    def from_embedding(cls, emb: nn.Embedding, comm: TPComm, **kw) -> "VocabParallelEmbedding":
        V, d = emb.weight.shape
        layer = cls(V, d, comm, **kw)
        layer.weight = tag(nn.Parameter(_take(emb.weight.data, 0, slice(layer.vocab_start, layer.vocab_end)),
                                        requires_grad=emb.weight.requires_grad), Partition(0, "vocab", V))
        _copy_attrs(emb, layer)
        return layer

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.comm.size == 1:
            return F.embedding(ids, self.weight)
        outside = (ids < self.vocab_start) | (ids >= self.vocab_end)
        local = (ids - self.vocab_start).masked_fill(outside, 0)
        out = F.embedding(local, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
        if self.sequence_parallel:
            return reduce_scatter_to_sp(self.comm, out, dim=1)
        return reduce_from_tp(self.comm, out)

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings} (rows {self.vocab_start}..{self.vocab_end - 1} here), {self.embedding_dim}, "
                f"tp={self.comm.size}")


def _copy_attrs(src: nn.Module, dst: nn.Module) -> None:
    """Keep the init/optimizer hints the model set on the original module and its weight."""
    for name in ("is_output_projection", "zero_init", "identity_init"):
        if hasattr(src, name):
            setattr(dst, name, getattr(src, name))
    w = getattr(src, "weight", None)
    if w is not None:
        for name in ("no_weight_decay", "zero_init", "identity_init"):
            if hasattr(w, name):
                setattr(dst.weight, name, getattr(w, name))
