"""State dicts read one tensor at a time, when a tensor is asked for.

`load` (megaloop/checkpoint/reader.py) returns one of these for a checkpoint saved with TP > 1
(`MergedShards`: its memory-mapped shards concatenated per tensor) and for a `.safetensors` file
(`SafetensorsStateDict`: each tensor read from the file when asked). A rank that starts from init.from
takes one parameter's full value at a time (megaloop/parallel/materialize.py cuts it to its own shard), so
it never holds the whole source; `shape_of` answers a shape without reading; code that wants a plain dict
(`dict(sd)`) reads everything, as before.
"""
from __future__ import annotations

from collections.abc import MutableMapping
from typing import Dict, List, Tuple

import torch


class LazyStateDict(MutableMapping):
    """A read-per-tensor mapping name -> tensor. Assigned keys and aliases (`alias`: a tied head) override
    what the source holds; deleted keys hide it. Subclasses give `_names`, `_read` and `_shape`."""

    def __init__(self):
        self._set: Dict[str, torch.Tensor] = {}
        self._alias: Dict[str, str] = {}
        self._dropped: set = set()

    def _names(self) -> List[str]:
        raise NotImplementedError

    def _read(self, key: str) -> torch.Tensor:
        raise NotImplementedError

    def _shape(self, key: str) -> Tuple[int, ...]:
        raise NotImplementedError

    def _has(self, key: str) -> bool:
        return key not in self._dropped and key in self._name_set()

    def _name_set(self) -> set:
        if getattr(self, "_names_cache", None) is None:
            self._names_cache = set(self._names())
        return self._names_cache

    def __getitem__(self, key: str) -> torch.Tensor:
        if key in self._set:
            return self._set[key]
        if key in self._alias:
            return self[self._alias[key]]
        if not self._has(key):
            raise KeyError(key)
        return self._read(key)

    def shape(self, key: str) -> Tuple[int, ...]:
        """The tensor's shape, without reading it."""
        if key in self._set:
            return tuple(self._set[key].shape)
        if key in self._alias:
            return self.shape(self._alias[key])
        if not self._has(key):
            raise KeyError(key)
        return tuple(self._shape(key))

    def alias(self, key: str, existing: str) -> None:
        """sd[key] is sd[existing] (a tied head), without reading either."""
        self._set.pop(key, None)
        self._dropped.discard(key)
        self._alias[key] = existing

    def is_alias(self, key: str, of: str) -> bool:
        return self._alias.get(key) == of

    def __setitem__(self, key: str, value: torch.Tensor) -> None:
        self._alias.pop(key, None)
        self._dropped.discard(key)
        self._set[key] = value

    def __delitem__(self, key: str) -> None:
        if key not in self:
            raise KeyError(key)
        self._set.pop(key, None)
        self._alias.pop(key, None)
        self._dropped.add(key)

    def _keys(self) -> List[str]:
        keys = dict.fromkeys(k for k in self._names() if k not in self._dropped)
        keys.update(dict.fromkeys(self._alias))
        keys.update(dict.fromkeys(self._set))
        return list(keys)

    def __iter__(self):
        return iter(self._keys())

    def __len__(self) -> int:
        return len(self._keys())

    def __contains__(self, key) -> bool:
        return key in self._set or key in self._alias or self._has(key)

    def copy(self) -> "LazyStateDict":
        import copy
        other = copy.copy(self)
        other._set, other._alias, other._dropped = dict(self._set), dict(self._alias), set(self._dropped)
        return other


class MergedShards(LazyStateDict):
    """The one-process state dict of TP shards. shards: per TP rank, LoopedLM-named state dicts (rank order,
    memory-mapped); info: name -> Partition (megaloop.parallel.apply_tp.partition_info_for)."""

    def __init__(self, shards: List[Dict[str, torch.Tensor]], info):
        super().__init__()
        self._shards, self._info = shards, info

    def _part(self, key):
        from megaloop.parallel.tensor_parallel import REPLICATED
        return self._info.get(key, REPLICATED)

    def _distinct(self, key) -> List[torch.Tensor]:
        part = self._part(key)
        if not part.sharded:
            return [self._shards[0][key]]
        return [self._shards[r][key] for r in range(0, len(self._shards), part.replicas)]

    def _names(self):
        return list(self._shards[0])

    def _read(self, key):
        pieces = self._distinct(key)
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=self._part(key).dim)

    def _shape(self, key):
        pieces = self._distinct(key)
        shape = list(pieces[0].shape)
        if len(pieces) > 1:
            dim = self._part(key).dim
            shape[dim] = sum(p.shape[dim] for p in pieces)
        return tuple(shape)


class SafetensorsStateDict(LazyStateDict):
    """The tensors of a .safetensors file, each read from the file when asked (safetensors holds no code)."""

    def __init__(self, path):
        super().__init__()
        from megaloop.checkpoint.safe_load import safetensors_index
        self._path = path
        self._shapes, self.metadata = safetensors_index(path)

    def _names(self):
        return list(self._shapes)

    def _read(self, key):
        from megaloop.checkpoint.safe_load import read_safetensors_tensor
        return read_safetensors_tensor(self._path, key)

    def _shape(self, key):
        return self._shapes[key]


def shape_of(sd, key: str) -> Tuple[int, ...]:
    """sd[key].shape, without reading a lazily read tensor."""
    return sd.shape(key) if isinstance(sd, LazyStateDict) else tuple(sd[key].shape)


def tie(sd, key: str, existing: str) -> None:
    """sd[key] = sd[existing], without reading a lazily read tensor."""
    if isinstance(sd, LazyStateDict):
        sd.alias(key, existing)
    else:
        sd[key] = sd[existing]


class Zero3StateDict(LazyStateDict):
    """The fp32 weights of a ZeRO-3 checkpoint (TP 1, PP 1), each gathered from the data-parallel ranks'
    memory-mapped files when asked. The layout is DeepSpeed's (deepspeed/utils/zero_to_fp32.py, which reads
    every rank's files whole): each trainable parameter is split into ceil(numel / dp) elements per rank,
    the last rank's part padded, and a rank's flat fp32 groups hold its parts in `param_shapes` order; a frozen
    parameter's parts are in each rank's model states (`frozen_param_fragments`); `shared_params` name tied
    parameters. model_states / flat_groups: per data-parallel rank, the model-states dict and the list of
    flat fp32 group tensors of its optimizer file."""

    def __init__(self, model_states: List[dict], flat_groups: List[List[torch.Tensor]], where: str = ""):
        import math
        super().__init__()
        self._states, self._groups = model_states, flat_groups
        world = len(flat_groups)
        first = model_states[0]
        self._trainable: Dict[str, Tuple[int, int, Tuple[int, ...]]] = {}  # name -> (offset, numel per rank, shape)
        offset = 0
        for group in first.get("param_shapes") or []:
            for name, shape in group.items():
                shape = tuple(shape)
                per_rank = math.ceil(math.prod(shape) / world)
                self._trainable[name] = (offset, per_rank, shape)
                offset += per_rank
        sizes = [t.numel() for t in flat_groups[0]]
        if offset != sum(sizes):
            from megaloop.checkpoint.layout import CheckpointError
            raise CheckpointError(f"{where}: the ZeRO-3 parameter shapes account for {offset} elements per rank, "
                                  f"the flat fp32 groups hold {sum(sizes)}: the files do not belong together")
        self._bounds = [0]
        for n in sizes:
            self._bounds.append(self._bounds[-1] + n)
        self._frozen = {k: tuple(v) for k, v in (first.get("frozen_param_shapes") or {}).items()}
        self._buffers = {k: first["module"][k] for k in first.get("buffer_names") or []}
        for name, source in (first.get("shared_params") or {}).items():
            self.alias(name, source)

    def _names(self):
        return list(self._buffers) + list(self._frozen) + list(self._trainable)

    def _shape(self, key):
        if key in self._buffers:
            return tuple(self._buffers[key].shape)
        return self._frozen[key] if key in self._frozen else self._trainable[key][2]

    def _read(self, key):
        import math
        if key in self._buffers:
            return self._buffers[key]
        if key in self._frozen:
            shape = self._frozen[key]
            parts = [s["frozen_param_fragments"][key].reshape(-1) for s in self._states]
            return torch.cat(parts)[:math.prod(shape)].view(shape)
        offset, per_rank, shape = self._trainable[key]
        chunks = []
        for groups in self._groups:  # every rank: its part, from the flat group(s) it lies in
            lo, hi = offset, offset + per_rank
            for g, t in enumerate(groups):
                a, b = max(lo, self._bounds[g]), min(hi, self._bounds[g + 1])
                if a < b:
                    chunks.append(t[a - self._bounds[g]:b - self._bounds[g]])
        return torch.cat(chunks)[:math.prod(shape)].view(shape)
