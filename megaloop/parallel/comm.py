"""Tensor-parallel collectives, Megatron's conjugate autograd operators, and a collective counter.

Every collective the TP layers issue goes through a `TPComm` (the TP process group plus its
counters), so what crosses the wire can be counted exactly:

    comm = TPComm.from_state(state)          # or TPComm(process_group)
    with comm.counting() as c:
        model(tokens, labels=labels).loss.backward()
    c.count("all_reduce", phase="forward"), c.payload_bytes(), c.wire_bytes()

The autograd operators (names as in Megatron-LM's `mappings.py`):

    copy_to_tp(comm, *xs)      "f": forward identity, backward ONE all-reduce (several inputs are
                               fused into one collective: FLT's query stream and the key/value stream)
    reduce_from_tp(comm, x)    "g": forward all-reduce, backward identity
    gather_from_tp(comm, x)    forward all-gather (last dim), backward take own chunk
    reduce_scatter_to_sp / gather_from_sp   sequence-parallel variants along the sequence dim

With one TP rank every operator is the identity and nothing is counted.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator, List, Optional, Sequence

import torch
import torch.distributed as dist

# ---------------------------------------------------------------------------------------------
# Counting


@dataclass
class CollectiveRecord:
    op: str  # all_reduce | all_gather | reduce_scatter | broadcast
    phase: str  # forward | backward | other
    numel: int  # elements in the (full, for all_gather: output) tensor
    nbytes: int  # payload bytes: the tensor one rank hands to the collective (all_gather: its output)
    group_size: int
    reduce_op: str = "sum"

    @property
    def wire_bytes(self) -> float:
        """Bytes one rank sends with a ring algorithm: all-reduce 2(n-1)/n x B, all-gather and
        reduce-scatter (n-1)/n x B (B = the full tensor), broadcast (n-1)/n x B (pipelined ring)."""
        n = self.group_size
        if self.op == "all_reduce":
            return 2.0 * (n - 1) / n * self.nbytes
        return (n - 1) / n * self.nbytes


@dataclass
class CollectiveCounter:
    records: List[CollectiveRecord] = field(default_factory=list)

    def _select(self, op: Optional[str], phase: Optional[str]):
        return [r for r in self.records if (op is None or r.op == op) and (phase is None or r.phase == phase)]

    def count(self, op: Optional[str] = None, phase: Optional[str] = None) -> int:
        return len(self._select(op, phase))

    def payload_bytes(self, op: Optional[str] = None, phase: Optional[str] = None) -> int:
        return sum(r.nbytes for r in self._select(op, phase))

    def wire_bytes(self, op: Optional[str] = None, phase: Optional[str] = None) -> float:
        return sum(r.wire_bytes for r in self._select(op, phase))

    def summary(self) -> dict:
        out = {}
        for r in self.records:
            key = f"{r.phase}/{r.op}"
            n, b = out.get(key, (0, 0))
            out[key] = (n + 1, b + r.nbytes)
        return out

    def clear(self) -> None:
        self.records.clear()


class TPComm:
    """The tensor-parallel process group of one model, and the counters watching it.

    Passed explicitly to every TP layer (no module globals). `group=None` with size 1 is the
    single-process case: every collective is a no-op.
    """

    def __init__(self, group=None, rank: Optional[int] = None, size: Optional[int] = None):
        self.group = group
        if size is None:
            size = dist.get_world_size(group) if (dist.is_available() and dist.is_initialized()) else 1
        if rank is None:
            rank = dist.get_rank(group) if size > 1 else 0
        self.size, self.rank = int(size), int(rank)
        self._counters: List[CollectiveCounter] = []

    @classmethod
    def from_state(cls, state) -> "TPComm":
        return cls(state.tp_group if state.tp_size > 1 else None, state.tp_rank, state.tp_size)

    @classmethod
    def coerce(cls, obj) -> "TPComm":
        """A TPComm from a TPComm, a ParallelState, a process group, or None (single process)."""
        if isinstance(obj, TPComm):
            return obj
        if obj is None:
            return cls(None, 0, 1)
        if hasattr(obj, "tp_group") and hasattr(obj, "tp_size"):
            return cls.from_state(obj)
        return cls(obj)

    def __repr__(self) -> str:
        return f"TPComm(rank={self.rank}, size={self.size})"

    # Deep copies and pickles of a TP model share the group instead of trying to copy it.
    def __deepcopy__(self, memo):
        return self

    def __getstate__(self):
        raise TypeError("a TPComm holds a process group and cannot be pickled; save the state_dict instead")

    @contextlib.contextmanager
    def counting(self) -> Iterator[CollectiveCounter]:
        counter = CollectiveCounter()
        self._counters.append(counter)
        try:
            yield counter
        finally:
            self._counters.remove(counter)

    def _record(self, op: str, phase: str, t: torch.Tensor, reduce_op: str = "sum", numel: Optional[int] = None) -> None:
        """numel: the elements of the full tensor when it is not `t` (all_gather: its output)."""
        if self._counters:
            n = t.numel() if numel is None else numel
            rec = CollectiveRecord(op, phase, n, n * t.element_size(), self.size, reduce_op)
            for c in self._counters:
                c.records.append(rec)

    # --- raw collectives (no autograd) ----------------------------------------------------------
    def all_reduce(self, t: torch.Tensor, op: str = "sum", phase: str = "other") -> torch.Tensor:
        """In place on `t` (returned)."""
        if self.size == 1:
            return t
        self._record("all_reduce", phase, t, op)
        rop = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}[op]
        dist.all_reduce(t, op=rop, group=self.group)
        return t

    def all_reduce_many(self, tensors: Sequence[torch.Tensor], phase: str = "other") -> List[torch.Tensor]:
        """Sum several tensors over the group with ONE collective (flatten, concatenate, split)."""
        if self.size == 1 or not tensors:
            return list(tensors)
        if len(tensors) == 1:
            return [self.all_reduce(tensors[0].contiguous().clone(), phase=phase)]
        dtype = tensors[0].dtype
        flat = torch.cat([t.reshape(-1).to(dtype) for t in tensors])
        self.all_reduce(flat, phase=phase)
        out, i = [], 0
        for t in tensors:
            out.append(flat[i:i + t.numel()].view_as(t).to(t.dtype))
            i += t.numel()
        return out

    def all_gather(self, t: torch.Tensor, dim: int = -1, phase: str = "other") -> torch.Tensor:
        """Concatenate every rank's `t` along `dim` (rank order)."""
        if self.size == 1:
            return t
        t = t.contiguous()
        parts = [torch.empty_like(t) for _ in range(self.size)]
        self._record("all_gather", phase, t, numel=t.numel() * self.size)
        dist.all_gather(parts, t, group=self.group)
        return torch.cat(parts, dim=dim)

    def reduce_scatter(self, t: torch.Tensor, dim: int, phase: str = "other") -> torch.Tensor:
        """Sum over ranks, then keep this rank's chunk along `dim`. gloo has no reduce_scatter, so
        there it runs as an all-reduce and a slice (counted as a reduce_scatter of the same payload;
        the analytic wire bytes are those of a real reduce-scatter)."""
        if self.size == 1:
            return t
        self._record("reduce_scatter", phase, t)
        t = t.contiguous()
        chunks = list(t.chunk(self.size, dim=dim))
        if dist.get_backend(self.group) == "gloo":
            full = t.clone()
            dist.all_reduce(full, group=self.group)
            return full.chunk(self.size, dim=dim)[self.rank].contiguous()
        out = torch.empty_like(chunks[self.rank])
        dist.reduce_scatter(out, [c.contiguous() for c in chunks], group=self.group)
        return out

    def broadcast(self, t: torch.Tensor, src_rank_in_group: int = 0, phase: str = "other") -> torch.Tensor:
        if self.size == 1:
            return t
        self._record("broadcast", phase, t)
        src = dist.get_global_rank(self.group, src_rank_in_group) if self.group is not None else src_rank_in_group
        dist.broadcast(t, src=src, group=self.group)
        return t

    def chunk(self, t: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """This rank's contiguous chunk of `t` along `dim` (no communication)."""
        if self.size == 1:
            return t
        size = t.shape[dim]
        if size % self.size:
            raise ValueError(f"cannot split dim {dim} of size {size} over {self.size} tensor-parallel ranks")
        return t.chunk(self.size, dim=dim)[self.rank].contiguous()


# ---------------------------------------------------------------------------------------------
# Megatron's conjugate operators


class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, comm: TPComm, *xs):
        ctx.comm = comm
        return xs if len(xs) > 1 else xs[0]

    @staticmethod
    def backward(ctx, *grads):
        needs = ctx.needs_input_grad[1:]
        idx = [i for i, g in enumerate(grads) if needs[i] and g is not None]
        reduced = ctx.comm.all_reduce_many([grads[i] for i in idx], phase="backward")
        out = [None] * len(grads)
        for i, g in zip(idx, reduced):
            out[i] = g
        return (None, *out)

    @staticmethod
    def jvp(ctx, _, *tangents):  # forward-mode AD (fixed-point diagnostics): identity, like forward
        views = tuple(t.view_as(t) for t in tangents)  # (forward returns its inputs: tangents as views)
        return views if len(views) > 1 else views[0]


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, comm: TPComm, x):
        ctx.comm = comm
        return comm.all_reduce(x.contiguous().clone(), phase="forward")

    @staticmethod
    def backward(ctx, g):
        return None, g

    @staticmethod
    def jvp(ctx, _, t):  # forward-mode AD: the forward is linear, so its tangent is summed the same way
        return ctx.comm.all_reduce(t.contiguous().clone(), phase="forward")


def _all_gather(comm: TPComm, t: torch.Tensor, dim: int, phase: str) -> torch.Tensor:
    return comm.all_gather(t, dim=dim, phase=phase)


def _reduce_scatter(comm: TPComm, t: torch.Tensor, dim: int, phase: str) -> torch.Tensor:
    return comm.reduce_scatter(t, dim=dim, phase=phase)


def _own_chunk(comm: TPComm, t: torch.Tensor, dim: int, phase: str) -> torch.Tensor:
    return comm.chunk(t, dim)


def _conjugate_pair(name: str, forward_op, backward_op):
    """An autograd operator along `dim`: forward_op in forward, its conjugate backward_op on the gradient."""

    class Op(torch.autograd.Function):
        @staticmethod
        def forward(ctx, comm: TPComm, x, dim: int):
            ctx.comm, ctx.dim = comm, dim
            return forward_op(comm, x, dim, "forward")

        @staticmethod
        def backward(ctx, g):
            return None, backward_op(ctx.comm, g, ctx.dim, "backward"), None

        @staticmethod
        def jvp(ctx, _, t, __):  # forward-mode AD: forward_op is linear, applied to the tangent
            return forward_op(ctx.comm, t, ctx.dim, "forward")

    Op.__name__ = Op.__qualname__ = name
    return Op


_GatherFromTP = _conjugate_pair("_GatherFromTP", _all_gather, _own_chunk)
_ReduceScatterToSP = _conjugate_pair("_ReduceScatterToSP", _reduce_scatter, _all_gather)
_GatherFromSP = _conjugate_pair("_GatherFromSP", _all_gather, _reduce_scatter)


def copy_to_tp(comm: TPComm, *xs):
    """f: identity forward; backward sums the input gradients over TP ranks in one all-reduce."""
    if comm.size == 1:
        return xs if len(xs) > 1 else xs[0]
    return _CopyToTP.apply(comm, *xs)


def reduce_from_tp(comm: TPComm, x: torch.Tensor) -> torch.Tensor:
    """g: forward all-reduce (sum of partial results), backward identity."""
    return x if comm.size == 1 else _ReduceFromTP.apply(comm, x)


def gather_from_tp(comm: TPComm, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    return x if comm.size == 1 else _GatherFromTP.apply(comm, x, dim)


def reduce_scatter_to_sp(comm: TPComm, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Sequence parallelism's g: forward reduce-scatter along the sequence, backward all-gather."""
    return x if comm.size == 1 else _ReduceScatterToSP.apply(comm, x, dim)


def gather_from_sp(comm: TPComm, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Sequence parallelism's f: forward all-gather along the sequence, backward reduce-scatter."""
    return x if comm.size == 1 else _GatherFromSP.apply(comm, x, dim)
