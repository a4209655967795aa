"""Reading only what a rank needs from a checkpoint (resume on another layout, init.from).

The files are memory-mapped (`torch.load(mmap=True)` through safe_load: still weights_only), so a byte
nobody reads is never resident, and a page that is read is file-backed page cache (shared by the ranks
of a node, reclaimable), not the process's own memory. What a rank materialises is one parameter at a
time: its TP slice under the new layout, cut from the old layout's TP shards that overlap it (the
shards that do not overlap are not touched), copied into memory of its own so the mapped file can go.

An old TP shard is a `Shard`: its shape and the 1-D pieces that hold it in order (one tensor for a
module / ZeRO 0 optimizer entry; a ZeRO 1/2 parameter split across data-parallel partitions is
several narrowed pieces of the flat partitions). Assembling a split shard copies that one shard.

The partition convention is megaloop.parallel.apply_tp's: a sharded tensor is the concatenation along
`Partition.dim` of the distinct shards of TP ranks 0, replicas, 2*replicas, ... (kv-replicated wk / wv:
`replicas` ranks hold the same shard); a replicated tensor is taken from TP rank 0.
"""
from __future__ import annotations

import dataclasses
from typing import List, Optional, Sequence, Tuple

import torch

from megaloop.checkpoint.layout import CheckpointError


@dataclasses.dataclass
class Shard:
    """One TP rank's tensor of a parameter in a checkpoint, not yet read."""
    shape: Tuple[int, ...]
    pieces: List[torch.Tensor]  # memory-mapped tensors; flattened and concatenated they are the shard
    where: str = ""             # the file (for messages)

    def tensor(self) -> torch.Tensor:
        """The shard at its shape: a view of the mapped file when it is one piece, else one copy."""
        if len(self.pieces) == 1 and tuple(self.pieces[0].shape) == self.shape:
            return self.pieces[0]
        numel = sum(p.numel() for p in self.pieces)
        if numel != int(torch.Size(self.shape).numel()):
            raise CheckpointError(f"{self.where}: holds {numel} elements, the shape {self.shape} needs "
                                  f"{int(torch.Size(self.shape).numel())}")
        flat = self.pieces[0].reshape(-1) if len(self.pieces) == 1 else torch.cat([p.reshape(-1) for p in self.pieces])
        return flat.view(self.shape)


def load_mapped(path):
    """safe_load.load(path) memory-mapped; a file torch cannot map (an old non-zip format) is read whole."""
    from megaloop.checkpoint.safe_load import load

    try:
        return load(path, mmap=True)
    except CheckpointError as e:
        if "refused" in str(e):
            raise
        return load(path)


def _sharded(part, tp: int) -> bool:
    return part is not None and part.sharded and tp > 1


def tp_slice(shards: Sequence[Shard], part_old, tp_old: int, part_new, tp_rank: int, tp_new: int,
             dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """TP rank tp_rank's tensor (of tp_new ranks, partition part_new) of a parameter saved as `shards`
    (one per old TP rank, partition part_old), in memory of its own (contiguous, `dtype` if given). Only
    the old shards that overlap the slice are read; the full tensor is never built unless it is the slice."""
    if not _sharded(part_old, tp_old):
        x = shards[0].tensor()
        if _sharded(part_new, tp_new):
            n = tp_new // part_new.replicas
            size = x.shape[part_new.dim] // n
            x = x.narrow(part_new.dim, (tp_rank // part_new.replicas) * size, size)
        return _own(x, dtype)
    dim = part_old.dim
    distinct = [shards[r] for r in range(0, tp_old, part_old.replicas)]
    step = distinct[0].shape[dim]
    total = step * len(distinct)
    lo, hi = 0, total
    if _sharded(part_new, tp_new):
        if part_new.dim != dim:
            raise CheckpointError(f"{distinct[0].where}: saved split along dimension {dim}, this run splits it "
                                  f"along {part_new.dim}")
        size = total // (tp_new // part_new.replicas)
        lo = (tp_rank // part_new.replicas) * size
        hi = lo + size
    pieces = []
    for i, shard in enumerate(distinct):
        a, b = max(lo, i * step), min(hi, (i + 1) * step)
        if a < b:  # (a shard outside the slice is never read)
            pieces.append(shard.tensor().narrow(dim, a - i * step, b - a))
    if len(pieces) == 1:
        return _own(pieces[0], dtype)
    out = torch.cat(pieces, dim)
    return out if dtype is None or out.dtype == dtype else out.to(dtype)


def _own(x: torch.Tensor, dtype: Optional[torch.dtype]) -> torch.Tensor:
    """A contiguous copy (never a view of the mapped file), in `dtype` if given."""
    if dtype is not None and x.dtype != dtype:
        return x.to(dtype).contiguous()
    return x.clone(memory_format=torch.contiguous_format)
