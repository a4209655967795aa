"""A training checkpoint's optimizer state, for resuming on another layout (megaloop.checkpoint.relayout).

TrainingStateReader maps a tag's files (memory-mapped, weights_only) to the AdamW state (fp32 master
weights, exp_avg, exp_avg_sq, step) of every LoopedLM parameter, per old TP rank, and reads one
parameter's slice for a rank of the new layout at a time (megaloop.checkpoint.sharded_read): a rank
holds its own share, not the model. load_training_state merges everything (the whole state in one
process: tests, tools).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

from megaloop.checkpoint.layout import CheckpointError
from megaloop.checkpoint.reader import CheckpointInfo, _require, _shard_shapes, read_info
from megaloop.checkpoint.sharded_read import Shard, load_mapped, tp_slice

# ------------------------------------------------------------------------------------------------
# The optimizer state too (resuming on another layout: megaloop.checkpoint.relayout)
#
# ZeRO 0 keeps torch's AdamW state_dict under 'optimizer' in mp_rank_MM_model_states.pt, indexed by the
# position of each parameter in the param groups (decay first, then no-decay, each in the order of the
# rank's module.named_parameters()): no names. The names are rebuilt here from the model config: with
# PP = 1 the LoopedLM's own order; with PP > 1 a stage's PipelineModule order (its tied modules first,
# then its layers in index order), the stage's layers being the contiguous range whose parameters match
# the saved state (counts, decay flags and shapes). ZeRO 1/2 write their names (`param_slice_mappings`
# in every zero_pp_rank_D_mp_rank_MM_optim_states.pt, `param_shapes` in the model states): the flat
# fp32 / exp_avg / exp_avg_sq partitions of the D data-parallel ranks are cut back into parameters.
# Model-parallel rank MM = stage x tp + tensor-parallel rank. TP shards merge as the weights do.

@dataclasses.dataclass
class TrainingState:
    """A training checkpoint's full (one-process) per-parameter state, keyed by LoopedLM parameter name."""
    info: CheckpointInfo
    weights: Dict[str, torch.Tensor]   # fp32 (ZeRO 1/2: the master weights of the optimizer partitions)
    exp_avg: Dict[str, torch.Tensor]
    exp_avg_sq: Dict[str, torch.Tensor]
    adam_step: int                      # AdamW's step count
    engine_state: dict                  # mp_rank_00's engine / client state (lr_scheduler, global_steps, ...)


def _lm_name(ds_name: str) -> str:
    """A PipelineModule parameter name -> the LoopedLM name (the layer classes keep LoopedLM names)."""
    if ds_name.startswith("tied_modules."):
        return ds_name.split(".", 2)[2]
    head, _, rest = ds_name.partition(".")
    return rest if head.isdigit() and rest else ds_name


def _pipeline_param_layers(mc) -> List[Tuple[Optional[str], List[Tuple[str, torch.nn.Parameter]]]]:
    """Per pipeline layer: (tie key or None, its (LoopedLM name, meta parameter) list)."""
    from megaloop.model import LoopedLM
    from megaloop.parallel.pipeline import build_layers, LayerSource, pipeline_layers

    with torch.device("meta"):
        lm = LoopedLM(mc)
    out, tied = [], {}
    for layer, created, _ in build_layers(pipeline_layers(mc), LayerSource(lambda: lm)):
        if layer.tie_key is not None:
            if created is not None:
                tied[layer.tie_key] = list(created.named_parameters())
            out.append((layer.tie_key, tied[layer.tie_key]))
        else:
            out.append((None, list(created.named_parameters()) if created is not None else []))
    return out


def _stage_names(layers, a: int, b: int) -> List[Tuple[str, torch.nn.Parameter]]:
    seen, names = set(), []
    order = [p for key in dict.fromkeys(k for k, _ in layers[a:b] if k is not None)
             for p in next(ps for k, ps in layers[a:b] if k == key)]
    order += [p for k, ps in layers[a:b] if k is None for p in ps]
    for n, p in order:
        if id(p) not in seen:
            seen.add(id(p))
            names.append((n, p))
    return names


def _groups(named) -> List[Tuple[bool, List[str]]]:
    from megaloop.model.weight_decay import is_no_decay
    decay = [n for n, p in named if not is_no_decay(n, p)]
    no_decay = [n for n, p in named if is_no_decay(n, p)]
    return [g for g in ((True, decay), (False, no_decay)) if g[1]]


def _zero0_match(groups, opt: dict, shapes) -> bool:
    saved = opt.get("param_groups") or []
    if len(saved) != len(groups):
        return False
    for (decay, names), sg in zip(groups, saved):
        if len(sg["params"]) != len(names) or bool(sg.get("decay", decay)) != decay:
            return False
        for n, i in zip(names, sg["params"]):
            st = opt["state"].get(i)
            if st is not None and tuple(st["exp_avg"].shape) != shapes[n]:
                return False
    return True


def _zero0_rank_state(opt: dict, groups, f: Path, shapes) -> Dict[str, dict]:
    out = {}
    for (_, names), sg in zip(groups, opt["param_groups"]):
        for n, i in zip(names, sg["params"]):
            st = opt["state"].get(i)
            if st is None:
                raise CheckpointError(f"{f}: AdamW holds no state for {n} (a step before the first?)")
            out[n] = {k: _whole(st[k], shapes[n], f, n) for k in ("exp_avg", "exp_avg_sq")} | {"step": st["step"]}
    return out


def _whole(t, shape, f: Path, name: str) -> Shard:
    if not torch.is_tensor(t) or tuple(t.shape) != tuple(shape):
        got = tuple(t.shape) if torch.is_tensor(t) else type(t).__name__
        raise CheckpointError(f"{f}: {name} is {got}, the saved config needs {tuple(shape)}")
    return Shard(tuple(shape), [t], str(f))


def _zero12_rank_state(ci: CheckpointInfo, mp: int, meta: dict, f_meta: Path, keep: list) -> Dict[str, dict]:
    """Per parameter of model-parallel rank mp: its fp32 / exp_avg / exp_avg_sq as Shards over the flat
    (memory-mapped) partitions of the data-parallel ranks (nothing is read here)."""
    d = ci.tag_dir
    shapes = meta.get("param_shapes")
    if not shapes:
        raise CheckpointError(f"{f_meta} has no 'param_shapes' (ZeRO {ci.zero_stage} names its parameters there)")
    parts = []
    for r in range(ci.dp):
        found = sorted(d.glob(f"*zero_pp_rank_{r}_mp_rank_{mp:02d}_optim_states.pt"))
        if not found:
            raise CheckpointError(f"checkpoint {d} is missing zero_pp_rank_{r}_mp_rank_{mp:02d}_optim_states.pt "
                                  f"(ZeRO {ci.zero_stage} data-parallel rank {r} of {ci.dp}, model-parallel rank {mp})")
        obj = load_mapped(found[0])
        keep.append(obj)
        osd = obj.get("optimizer_state_dict") or {}
        base = osd.get("base_optimizer_state")
        states = list(base["state"].values()) if isinstance(base, dict) else list(base or [])
        if "param_slice_mappings" not in osd or not states:
            raise CheckpointError(f"{found[0]}: no param_slice_mappings / optimizer state (DeepSpeed < 0.10?)")
        parts.append((found[0], osd["single_partition_of_fp32_groups"], states, osd["param_slice_mappings"]))
    out = {}
    for g, group_shapes in enumerate(shapes):
        for name, shape in group_shapes.items():
            pieces = {"fp32": [], "exp_avg": [], "exp_avg_sq": []}
            step, where = None, []
            for f, fp32, states, maps in parts:
                frag = maps[g].get(name)
                if frag is None:
                    continue
                where.append(f.name)
                pieces["fp32"].append(fp32[g].narrow(0, frag.start, frag.numel))
                for k in ("exp_avg", "exp_avg_sq"):
                    pieces[k].append(states[g][k].narrow(0, frag.start, frag.numel))
                step = states[g].get("step", step)
            numel = int(torch.Size(shape).numel())
            held = sum(p.numel() for p in pieces["fp32"])
            if held != numel:
                raise CheckpointError(f"checkpoint {d}: the ZeRO partitions of {name} (model-parallel rank {mp}) "
                                      f"hold {held} elements, its shape {tuple(shape)} needs {numel}")
            src = f"{d} ({', '.join(where)}) {name}"
            out[_lm_name(name)] = {k: Shard(tuple(shape), v, src) for k, v in pieces.items()} | {"step": step}
    return out


class TrainingStateReader:
    """A training checkpoint's per-parameter AdamW state (fp32 weights, exp_avg, exp_avg_sq), memory-mapped and
    read one parameter at a time (megaloop.checkpoint.sharded_read): `local(name, key, partition, tp_rank, tp)`
    is that parameter's slice for a TP rank of another layout; only the old shards it overlaps are read.
    ZeRO 0-2, any TP x PP x DP. Raises CheckpointError for ZeRO 3 or a state it cannot map."""
    KEYS = ("fp32", "exp_avg", "exp_avg_sq")

    def __init__(self, tag_dir):
        ci = read_info(Path(tag_dir))
        mc, tp, pp, d = ci.config.model, ci.tp, ci.pp, ci.tag_dir
        if ci.zero_stage not in (0, 1, 2):
            raise CheckpointError(f"{d}: reading the optimizer state of a ZeRO {ci.zero_stage} checkpoint is not "
                                  f"supported")
        self.info, self._keep = ci, []
        shapes, self.partitions = _shard_shapes(mc, tp)
        files = [d / f"mp_rank_{m:02d}_model_states.pt" for m in range(pp * tp)]
        _require([(f, f"model-parallel rank {m} of {pp * tp}") for m, f in enumerate(files)], d)
        layers = _pipeline_param_layers(mc) if pp > 1 else None
        if pp == 1:
            from megaloop.model import LoopedLM
            with torch.device("meta"):
                lm = LoopedLM(mc)
            seen, flat = set(), []
            for n, p in lm.named_parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    flat.append((n, p))
        per_tp: List[Dict[str, dict]] = [{} for _ in range(tp)]
        self.engine_state = {}
        start = [0] * tp
        for m, f in enumerate(files):
            stage, t = divmod(m, tp)
            meta = load_mapped(f)
            self._keep.append(meta)
            if m == 0:
                self.engine_state = {k: v for k, v in meta.items() if k not in ("module", "optimizer")}
            if ci.zero_stage == 0:
                opt = meta.get("optimizer")
                if not isinstance(opt, dict) or "state" not in opt:
                    raise CheckpointError(f"{f} has no optimizer state under 'optimizer'")
                if pp == 1:
                    named = flat
                else:
                    last = stage == pp - 1
                    ends = [len(layers)] if last else range(start[t] + 1, len(layers))
                    named = None
                    for b in ends:
                        cand = _stage_names(layers, start[t], b)
                        if _zero0_match(_groups(cand), opt, shapes):
                            named, start[t] = cand, b
                            break
                    if named is None:
                        raise CheckpointError(f"{f}: cannot tell which pipeline layers stage {stage} held (its AdamW "
                                              f"state matches no contiguous layer range of the saved config)")
                groups = _groups(named)
                if not _zero0_match(groups, opt, shapes):
                    raise CheckpointError(f"{f}: the AdamW state does not match the saved config's parameters")
                rank_state = _zero0_rank_state(opt, groups, f, shapes)
                for n, st in rank_state.items():
                    st["fp32"] = self._zero0_weight(meta, f, n, t, shapes)
            else:
                rank_state = _zero12_rank_state(ci, m, meta, f, self._keep)
            for n, st in rank_state.items():
                per_tp[t].setdefault(n, st)  # (a tied parameter on two stages: the same values, take the first)
        self.names = list(per_tp[0])
        if any(set(s) != set(self.names) for s in per_tp):
            raise CheckpointError(f"{d}: the tensor-parallel ranks hold different parameters")
        steps = {float(s[n]["step"]) for s in per_tp for n in self.names if s[n]["step"] is not None}
        if len(steps) != 1:
            raise CheckpointError(f"{d}: AdamW step counts differ across parameters ({sorted(steps)[:4]})")
        self.adam_step = int(steps.pop())
        self._per_tp = per_tp

    def _zero0_weight(self, meta: dict, f: Path, name: str, t: int, shapes) -> Shard:
        """ZeRO 0's weights: the module of mp_rank_MM (PP = 1), else the pipeline layer file holding `name`."""
        ci = self.info
        if ci.pp == 1:
            module = meta.get("module")
            if not isinstance(module, dict) or name not in module:
                raise CheckpointError(f"{f} has no model weight {name} under 'module'")
            return _whole(module[name], shapes[name], f, name)
        if not hasattr(self, "_layer_of"):
            from megaloop.parallel.pipeline import layer_state_keys
            self._layer_of, self._layer_files = {}, {}
            for idx, (_, keys) in enumerate(layer_state_keys(ci.config.model)):
                for k in keys or ():
                    self._layer_of.setdefault(k, idx)
        idx = self._layer_of.get(name)
        lf = ci.tag_dir / f"layer_{idx:02d}-model_{t:02d}-model_states.pt"
        if ci.tp == 1 and not lf.exists() and (ci.tag_dir / f"layer_{idx:02d}-model_states.pt").exists():
            lf = ci.tag_dir / f"layer_{idx:02d}-model_states.pt"  # a topology without a model axis
        if lf not in self._layer_files:
            _require([(lf, f"pipeline layer {idx}, tensor-parallel rank {t} of {ci.tp}")], ci.tag_dir)
            self._layer_files[lf] = load_mapped(lf)
        sd = self._layer_files[lf]
        if not isinstance(sd, dict) or name not in sd:
            raise CheckpointError(f"{lf} has no {name}")
        return _whole(sd[name], shapes[name], lf, name)

    def local(self, name: str, key: str, partition=None, tp_rank: int = 0, tp: int = 1) -> torch.Tensor:
        """fp32 tensor of `key` ("fp32", "exp_avg", "exp_avg_sq") of parameter `name` for TP rank tp_rank of tp
        (its Partition under the new layout; None or tp 1: the full tensor), in memory of its own."""
        return tp_slice([s[name][key] for s in self._per_tp], self.partitions.get(name), self.info.tp,
                        partition, tp_rank, tp, torch.float32)

    def close(self) -> None:
        """Drop the mapped files (the tensors `local` returned stay valid)."""
        self._keep, self._per_tp, self._layer_files = [], [], {}


def load_training_state(tag_dir) -> TrainingState:
    """Weights, AdamW moments and step of a complete tag folder, merged to the one-process LoopedLM
    (ZeRO 0-2, any TP x PP x DP): the whole state in memory (a resume reads per rank: TrainingStateReader)."""
    r = TrainingStateReader(tag_dir)
    full = {k: {n: r.local(n, k) for n in r.names} for k in r.KEYS}
    r.close()
    return TrainingState(r.info, full["fp32"], full["exp_avg"], full["exp_avg_sq"], r.adam_step, r.engine_state)
