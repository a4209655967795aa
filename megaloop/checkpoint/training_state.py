"""A training checkpoint's full optimizer state, for resuming on another layout (megaloop.checkpoint.relayout).

The weights of any layout are merged by megaloop.checkpoint.reader; this module merges the AdamW state
(fp32 master weights, exp_avg, exp_avg_sq, step) the same way, keyed by LoopedLM parameter name.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

from megaloop.checkpoint.layout import CheckpointError
from megaloop.checkpoint.reader import (CheckpointInfo, _load, _merge, _require, _shard_shapes,
                                        load_deepspeed_checkpoint, read_info)

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


def _zero0_rank_state(opt: dict, groups, f: Path) -> Dict[str, Dict[str, torch.Tensor]]:
    out = {}
    for (_, names), sg in zip(groups, opt["param_groups"]):
        for n, i in zip(names, sg["params"]):
            st = opt["state"].get(i)
            if st is None:
                raise CheckpointError(f"{f}: AdamW holds no state for {n} (a step before the first?)")
            out[n] = {"exp_avg": st["exp_avg"], "exp_avg_sq": st["exp_avg_sq"], "step": st["step"]}
    return out


def _zero12_rank_state(ci: CheckpointInfo, mp: int, meta: dict, f_meta: Path) -> Dict[str, Dict[str, torch.Tensor]]:
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
        osd = _load(found[0]).get("optimizer_state_dict") or {}
        base = osd.get("base_optimizer_state")
        states = list(base["state"].values()) if isinstance(base, dict) else list(base or [])
        if "param_slice_mappings" not in osd or not states:
            raise CheckpointError(f"{found[0]}: no param_slice_mappings / optimizer state (DeepSpeed < 0.10?)")
        parts.append((found[0], osd["single_partition_of_fp32_groups"], states, osd["param_slice_mappings"]))
    out = {}
    for g, group_shapes in enumerate(shapes):
        for name, shape in group_shapes.items():
            pieces = {"fp32": [], "exp_avg": [], "exp_avg_sq": []}
            step = None
            for f, fp32, states, maps in parts:
                frag = maps[g].get(name)
                if frag is None:
                    continue
                pieces["fp32"].append(fp32[g].narrow(0, frag.start, frag.numel))
                for k in ("exp_avg", "exp_avg_sq"):
                    pieces[k].append(states[g][k].narrow(0, frag.start, frag.numel))
                step = states[g].get("step", step)
            full = {k: torch.cat(v) if v else torch.empty(0) for k, v in pieces.items()}
            numel = int(torch.Size(shape).numel())
            if full["fp32"].numel() != numel:
                raise CheckpointError(f"checkpoint {d}: the ZeRO partitions of {name} (model-parallel rank {mp}) "
                                      f"hold {full['fp32'].numel()} elements, its shape {tuple(shape)} needs {numel}")
            out[_lm_name(name)] = {k: v.reshape(tuple(shape)).clone() for k, v in full.items()} | {"step": step}
    return out


def load_training_state(tag_dir) -> TrainingState:
    """Weights, AdamW moments and step of a complete tag folder, merged to the one-process LoopedLM
    (ZeRO 0-2, any TP x PP x DP). Raises CheckpointError for ZeRO 3 or a state it cannot map."""
    ci = read_info(Path(tag_dir))
    mc, tp, pp, d = ci.config.model, ci.tp, ci.pp, ci.tag_dir
    if ci.zero_stage not in (0, 1, 2):
        raise CheckpointError(f"{d}: reading the optimizer state of a ZeRO {ci.zero_stage} checkpoint is not supported")
    shapes, info = _shard_shapes(mc, tp)
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
    per_tp: List[Dict[str, Dict[str, torch.Tensor]]] = [{} for _ in range(tp)]
    engine_state = {}
    start = [0] * tp
    for m, f in enumerate(files):
        stage, t = divmod(m, tp)
        meta = _load(f)
        if m == 0:
            engine_state = {k: v for k, v in meta.items() if k not in ("module", "optimizer")}
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
            rank_state = _zero0_rank_state(opt, groups, f)
        else:
            rank_state = _zero12_rank_state(ci, m, meta, f)
        for n, st in rank_state.items():
            per_tp[t].setdefault(n, st)  # (a tied parameter on two stages: the same values, take the first)
    names = list(per_tp[0])
    if any(set(s) != set(names) for s in per_tp):
        raise CheckpointError(f"{d}: the tensor-parallel ranks hold different parameters")
    full = {}
    for key in ("exp_avg", "exp_avg_sq") + (("fp32",) if ci.zero_stage else ()):
        full[key] = _merge([{n: s[n][key] for n in names} for s in per_tp], info,
                           [f"tensor-parallel rank {t}" for t in range(tp)])
    if ci.zero_stage == 0:
        sd, _ = load_deepspeed_checkpoint(d, verify=False)  # (the resume verified the tag)
        weights = {n: sd[n].float() for n in names}
    else:
        weights = full["fp32"]
    steps = {float(s[n]["step"]) for s in per_tp for n in names if s[n]["step"] is not None}
    if len(steps) != 1:
        raise CheckpointError(f"{d}: AdamW step counts differ across parameters ({sorted(steps)[:4]})")
    return TrainingState(ci, weights, full["exp_avg"], full["exp_avg_sq"], int(steps.pop()), engine_state)
