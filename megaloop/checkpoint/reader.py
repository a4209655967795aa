"""Read a megaloop training checkpoint as the one-process LoopedLM, offline (no process group, no
DeepSpeed engine): any TP x PP x DP layout and ZeRO 0-3 (and the plain format of plain.py).

    sd, cfg = load(path, step)                 # merged state dict (LoopedLM names) + run config
    model, cfg = load_model(path, step)        # the LoopedLM itself

`path` is what layout.resolve takes (a run folder, a checkpoint root or one tag folder) or a plain
torch.save'd file / folder. What a tag folder holds:

    megaloop_complete.json                completeness marker (written after every rank's files)
    mp_rank_MM_model_states.pt            one per model-parallel rank MM < PP x TP (DP rank 0 writes);
                                          DeepSpeed's client state: "config" (the resolved run config),
                                          "tokenizer", "step", ... and, with PP = 1 and ZeRO 0-2,
                                          "module" = LoopedLM.state_dict() of TP rank MM
    layer_LL-model_TT-model_states.pt     PP > 1: pipeline layer LL of TP rank TT (keys are already
                                          LoopedLM names: the pipeline layer classes keep them)
    zero_pp_rank_D_mp_rank_MM_model_states.pt, *optim_states.pt
                                          ZeRO-3 (PP = 1, TP = 1): the module holds empty placeholders;
                                          the weights live in the optimizer partitions (gathered per
                                          tensor, as DeepSpeed's zero_to_fp32 lays them out:
                                          lazy_state_dict.Zero3StateDict)
    rng_rankNNNNN.pt                      (resume only)

Which keys each pipeline layer file holds comes from megaloop.parallel.pipeline.layer_state_keys, the
same layer list the pipeline is built from (the tied head has no file: the embedding file, layer 00,
holds `embedding.weight` and `head.weight`). TP shards are merged per tensor as it is read
(megaloop/checkpoint/lazy_state_dict.py; the partition convention: megaloop.parallel.apply_tp.partition_info_for). Every file and every shard shape is checked before merging; a missing or
mismatched file raises CheckpointError naming it.
"""
from __future__ import annotations

import dataclasses
import re
import warnings
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

from megaloop.checkpoint.layout import CheckpointError, is_deepspeed_checkpoint, marker, resolve
from megaloop.checkpoint.plain import load_plain_config, load_plain_state_dict
from megaloop.config import Config, ConfigError, ModelConfig, config_from_dict
from megaloop.checkpoint.saved_config import saved_config_from_dict


def expected_shapes(mc: ModelConfig) -> Dict[str, Tuple[int, ...]]:
    """Every key of LoopedLM(mc).state_dict() and its shape (built on the meta device: no memory)."""
    from megaloop.model import LoopedLM

    with torch.device("meta"):
        model = LoopedLM(mc)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


# ------------------------------------------------------------------------------------------------
# A DeepSpeed training checkpoint (one tag folder)


@dataclasses.dataclass
class CheckpointInfo:
    tag_dir: Path
    step: Optional[int]
    config: Config
    tokenizer: Dict[str, Optional[str]]
    pp: int
    tp: int
    dp: int
    zero_stage: int
    meta_file: Path
    data_fingerprint: Optional[dict] = None  # megaloop.data.fingerprint (None: saved before it was recorded)


def _load(path: Path):
    """A checkpoint file, memory-mapped (megaloop.checkpoint.sharded_read.load_mapped): what is not read of it
    (the optimizer state beside the weights, another rank's shard) is never resident."""
    from megaloop.checkpoint.sharded_read import load_mapped

    return load_mapped(path)


def read_info(tag_dir: Path) -> CheckpointInfo:
    """The run config, tokenizer reference and parallel layout stored with a tag (one small file read)."""
    candidates = sorted(tag_dir.glob("mp_rank_*_model_states.pt")) + \
        sorted(tag_dir.glob("zero_pp_rank_*_mp_rank_*_model_states.pt"))
    if not candidates:
        raise CheckpointError(f"{tag_dir} holds no DeepSpeed model states (mp_rank_00_model_states.pt, or "
                              f"zero_pp_rank_0_mp_rank_00_model_states.pt for ZeRO-3); the checkpoint is incomplete")
    meta_file = candidates[0]
    meta = _load(meta_file)
    if not isinstance(meta, dict) or not isinstance(meta.get("config"), dict):
        raise CheckpointError(f"{meta_file} has no 'config' in its client state: not a megaloop training checkpoint")
    try:
        cfg = saved_config_from_dict(meta["config"])
    except ConfigError as e:
        raise CheckpointError(f"{meta_file}: the run config saved in the checkpoint is invalid: {e}") from e
    dims = meta.get("checkpoint_parallel_dimensions") or {}
    pp = int(dims.get("pp_degree", cfg.parallel.pipeline_parallel))
    tp = int(dims.get("tp_degree", cfg.parallel.tensor_parallel))
    if (pp, tp) != (cfg.parallel.pipeline_parallel, cfg.parallel.tensor_parallel):
        raise CheckpointError(f"{meta_file}: DeepSpeed recorded pp={pp}, tp={tp} but the saved config says "
                              f"pipeline_parallel={cfg.parallel.pipeline_parallel}, tensor_parallel="
                              f"{cfg.parallel.tensor_parallel}")
    zero = int(((meta.get("ds_config") or {}).get("zero_optimization") or {}).get("stage", cfg.parallel.zero_stage))
    tok = meta.get("tokenizer") or {"type": cfg.data.tokenizer_type, "model": cfg.data.tokenizer_model}
    step = marker(tag_dir).get("step", meta.get("step"))
    return CheckpointInfo(tag_dir, None if step is None else int(step), cfg, dict(tok), pp, tp,
                          int(meta.get("dp_world_size") or 1), zero, meta_file, meta.get("data_fingerprint"))


def _shard_shapes(mc, tp: int) -> Tuple[Dict[str, Tuple[int, ...]], Dict[str, object]]:
    full = expected_shapes(mc)
    if tp == 1:
        return full, {}
    from megaloop.parallel.apply_tp import partition_info_for

    info = partition_info_for(mc, tp)
    shapes = {}
    for k, shape in full.items():
        part = info.get(k)
        if part is not None and part.sharded:
            s = list(shape)
            s[part.dim] = shape[part.dim] // (tp // part.replicas)
            shapes[k] = tuple(s)
        else:
            shapes[k] = shape
    return shapes, info


def _check_shard(sd, f: Path, want_keys, shapes, what: str) -> Dict[str, torch.Tensor]:
    from megaloop.checkpoint.lazy_state_dict import LazyStateDict, shape_of
    lazy = isinstance(sd, LazyStateDict)
    if not isinstance(sd, dict) and not lazy:
        raise CheckpointError(f"{f}: not a state dict ({type(sd).__name__}); {what}")
    got, want = set(sd), set(want_keys)
    problems = []
    if want - got:
        problems.append(f"missing {', '.join(sorted(want - got)[:8])}")
    if got - want:
        problems.append(f"unexpected {', '.join(sorted(got - want)[:8])}")
    for k in sorted(want & got):
        if not lazy and not torch.is_tensor(sd[k]):
            problems.append(f"{k} is not a tensor")
        elif shape_of(sd, k) != shapes[k]:
            problems.append(f"{k} has shape {shape_of(sd, k)}, expected {shapes[k]}")
    if problems:
        raise CheckpointError(f"{f} ({what}) does not match the run config: " + "; ".join(problems)
                              + ". Was the file replaced, or written by another run/layout?")
    if lazy:  # (every key wanted: nothing read here)
        return sd
    return {k: sd[k] for k in want_keys}


def _require(files: List[Tuple[Path, str]], tag_dir: Path) -> None:
    missing = [(f, what) for f, what in files if not f.is_file()]
    if missing:
        listing = "; ".join(f"{f.name} ({what})" for f, what in missing[:6])
        more = f" and {len(missing) - 6} more" if len(missing) > 6 else ""
        raise CheckpointError(f"checkpoint {tag_dir} is missing {len(missing)} file(s): {listing}{more}. The "
                              f"checkpoint is damaged (a shard deleted or not copied)")


def _merge(shards: List[Dict[str, torch.Tensor]], info, files: List[str]) -> Dict[str, torch.Tensor]:
    if len(shards) == 1:
        return dict(shards[0])
    from megaloop.checkpoint.lazy_state_dict import MergedShards

    # Replicated tensors must agree across TP ranks (within a kv-replica group for kv_replicated).
    for k, t0 in shards[0].items():
        part = info.get(k)
        groups = [list(range(len(shards)))] if part is None or not part.sharded else \
            [list(range(g, g + part.replicas)) for g in range(0, len(shards), part.replicas)]
        for g in groups:
            for r in g[1:]:
                a, b = shards[g[0]][k], shards[r][k]
                if not torch.equal(a, b):
                    diff = (a.float() - b.float()).abs().max().item()
                    warnings.warn(f"{k}: replicated across TP ranks but {files[r]} differs from {files[g[0]]} "
                                  f"by up to {diff:.3g}; taking tensor-parallel rank {g[0]}'s copy")
    return MergedShards(shards, info)  # (merged per tensor when read: see lazy_state_dict.py)


def _load_pipeline(ci: CheckpointInfo) -> Dict[str, torch.Tensor]:
    from megaloop.parallel.pipeline import layer_state_keys

    mc, tp, d = ci.config.model, ci.tp, ci.tag_dir
    layers = layer_state_keys(mc)
    shapes, info = _shard_shapes(mc, tp)

    def layer_file(idx: int, t: int) -> Path:
        f = d / f"layer_{idx:02d}-model_{t:02d}-model_states.pt"
        if tp == 1 and not f.exists() and (d / f"layer_{idx:02d}-model_states.pt").exists():
            return d / f"layer_{idx:02d}-model_states.pt"  # a topology without a model axis
        return f

    expected = [(d / f"mp_rank_{m:02d}_model_states.pt", f"model-parallel rank {m} of {ci.pp * tp}")
                for m in range(ci.pp * tp)]
    for idx, (name, keys) in enumerate(layers):
        if keys is not None:
            expected += [(layer_file(idx, t), f"pipeline layer {idx} '{name}', tensor-parallel rank {t} of {tp}")
                         for t in range(tp)]
    _require(expected, d)
    stray = sorted(p.name for p in d.glob("layer_*-model_states.pt")
                   if int(re.match(r"layer_(\d+)", p.name).group(1)) >= len(layers)
                   or layers[int(re.match(r"layer_(\d+)", p.name).group(1))][1] is None)
    if stray:
        raise CheckpointError(f"{d} has pipeline layer files the run config does not have ({', '.join(stray)}): "
                              f"the saved config does not describe these files")
    shards, names = [], []
    for t in range(tp):
        sd = {}
        for idx, (name, keys) in enumerate(layers):
            if keys is None:
                continue
            f = layer_file(idx, t)
            part = _check_shard(_load(f), f, keys, shapes,
                                f"pipeline layer {idx} '{name}', tensor-parallel rank {t} of {tp}")
            dup = set(part) & set(sd)
            if dup:
                raise CheckpointError(f"{f}: {sorted(dup)[:4]} also appear in an earlier layer file")
            sd.update(part)
        shards.append(sd)
        names.append(f"tensor-parallel rank {t}")
    return _merge(shards, info, names)


def _load_pp1(ci: CheckpointInfo) -> Dict[str, torch.Tensor]:
    mc, tp, d = ci.config.model, ci.tp, ci.tag_dir
    files = [d / f"mp_rank_{t:02d}_model_states.pt" for t in range(tp)]
    _require([(f, f"tensor-parallel rank {t} of {tp}") for t, f in enumerate(files)], d)
    shapes, info = _shard_shapes(mc, tp)
    keys = list(expected_shapes(mc))
    shards = []
    for t, f in enumerate(files):
        obj = _load(f)
        module = obj.get("module") if isinstance(obj, dict) else None
        if not isinstance(module, dict):
            raise CheckpointError(f"{f} has no model weights under 'module' (got {type(module).__name__})")
        optional = {"head.weight"} if mc.tie_embeddings and "head.weight" not in module else set()
        shards.append(_check_shard(module, f, [k for k in keys if k not in optional], shapes,
                                   f"tensor-parallel rank {t} of {tp}"))
    return _merge(shards, info, [f.name for f in files])


def _load_zero3(ci: CheckpointInfo) -> Dict[str, torch.Tensor]:
    d = ci.tag_dir
    if ci.tp != 1 or ci.pp != 1:
        raise CheckpointError(f"{d}: ZeRO-3 with tensor_parallel={ci.tp}, pipeline_parallel={ci.pp} is not a layout "
                              f"megaloop trains")
    expected = []
    for r in range(ci.dp):
        expected.append((d / f"zero_pp_rank_{r}_mp_rank_00_model_states.pt", f"ZeRO-3 data-parallel rank {r}"))
    _require(expected, d)
    for r in range(ci.dp):
        if not list(d.glob(f"*zero_pp_rank_{r}_mp_rank_00_optim_states.pt")):
            raise CheckpointError(f"checkpoint {d} is missing zero_pp_rank_{r}_mp_rank_00_optim_states.pt (ZeRO-3 "
                                  f"data-parallel rank {r} of {ci.dp}: it holds that rank's partition of the weights)")
    from megaloop.checkpoint.lazy_state_dict import Zero3StateDict
    from megaloop.checkpoint.sharded_read import load_mapped

    states, groups = [], []
    for r in range(ci.dp):  # (memory-mapped, weights_only: both files read before either is judged)
        f_model = d / f"zero_pp_rank_{r}_mp_rank_00_model_states.pt"
        f_optim = sorted(d.glob(f"*zero_pp_rank_{r}_mp_rank_00_optim_states.pt"))[0]
        obj, opt = load_mapped(f_model), load_mapped(f_optim)
        if not isinstance(obj, dict) or not isinstance(obj.get("param_shapes"), list):
            raise CheckpointError(f"{f_model} has no ZeRO-3 'param_shapes': not a ZeRO-3 model-states file")
        osd = opt.get("optimizer_state_dict") if isinstance(opt, dict) else None
        flat = osd.get("fp32_flat_groups") if isinstance(osd, dict) else None
        if not isinstance(flat, list) or not all(torch.is_tensor(t) for t in flat):
            raise CheckpointError(f"{f_optim} has no ZeRO-3 'fp32_flat_groups': not a ZeRO-3 optimizer file")
        states.append(obj)
        groups.append(flat)
    if len({tuple(t.numel() for t in g) for g in groups}) > 1:
        raise CheckpointError(f"{d}: the ZeRO-3 data-parallel ranks' flat fp32 groups differ in size: the files do "
                              f"not belong together")
    sd = Zero3StateDict(states, groups, str(d))  # (read per tensor: megaloop/checkpoint/lazy_state_dict.py)
    shapes = expected_shapes(ci.config.model)
    keys = [k for k in shapes if k in sd or not (k == "head.weight" and ci.config.model.tie_embeddings)]
    return _check_shard(sd, d, keys, shapes, f"ZeRO-3 weights of {ci.dp} data-parallel rank(s)")


def load_deepspeed_checkpoint(path, step: Optional[int] = None,
                              verify: bool = True) -> Tuple[Dict[str, torch.Tensor], CheckpointInfo]:
    """(state dict with LoopedLM names, CheckpointInfo) of the tag `resolve(path, step)` names; with
    verify, its files are also checked against the checksums in its marker (integrity.verify_tag) before
    anything is returned: after the structural checks, whose messages name the layer / rank of a missing
    or mis-shaped file."""
    from megaloop.checkpoint.integrity import verified
    ci = read_info(resolve(path, step))
    if ci.pp > 1:
        sd = _load_pipeline(ci)
    elif ci.zero_stage == 3:
        sd = _load_zero3(ci)
    else:
        sd = _load_pp1(ci)
    verified(ci.tag_dir, verify)
    return _tie_head(sd, ci.config.model), ci


def _tie_head(sd: Dict[str, torch.Tensor], mc: ModelConfig) -> Dict[str, torch.Tensor]:
    from megaloop.checkpoint.lazy_state_dict import tie
    if mc.tie_embeddings and "head.weight" not in sd and "embedding.weight" in sd:
        tie(sd, "head.weight", "embedding.weight")
    return sd


def checkpoint_config(ci: CheckpointInfo) -> Config:
    """The run config with the tokenizer reference stored in the checkpoint."""
    cfg = ci.config
    tok = ci.tokenizer
    if tok.get("type"):
        cfg.data.tokenizer_type = tok["type"]
        cfg.data.tokenizer_model = tok.get("model")
        cfg.data.tokenizer_eod = tok.get("eod", cfg.data.tokenizer_eod)
    return cfg


# ------------------------------------------------------------------------------------------------
# Any checkpoint (DeepSpeed training checkpoint or plain file)


def load_state_dict(path, step: Optional[int] = None, verify: bool = True) -> Dict[str, torch.Tensor]:
    """The full (merged) LoopedLM state dict of a checkpoint (verify: see load_deepspeed_checkpoint)."""
    if is_deepspeed_checkpoint(path):
        return load_deepspeed_checkpoint(path, step, verify)[0]
    return load_plain_state_dict(path, step)


def load_config(path, step: Optional[int] = None) -> Config:
    """The run config of a checkpoint, with its tokenizer reference (for a training checkpoint the
    resolved config stored in its client state; one small file is read)."""
    if is_deepspeed_checkpoint(path):
        return checkpoint_config(read_info(resolve(path, step)))
    return load_plain_config(path, step)


def load(path, step: Optional[int] = None, verify: bool = True) -> Tuple[Dict[str, torch.Tensor], Config]:
    """(full LoopedLM state dict, run config) of a checkpoint; verify: the tag's checksums are checked
    first (a damaged file is refused naming it; see megaloop.checkpoint.integrity)."""
    if is_deepspeed_checkpoint(path):
        sd, ci = load_deepspeed_checkpoint(path, step, verify)
        return sd, checkpoint_config(ci)
    cfg = load_plain_config(path, step)
    return load_plain_state_dict(path, step), cfg


def load_model(path, step: Optional[int] = None, device=None, verify: bool = True):
    """(LoopedLM with the checkpoint's weights, its run config): the one way to get the trained model in
    one process (evaluation, sampling, export); verify: as in `load`."""
    from megaloop.model import build_model

    sd, cfg = load(path, step, verify)
    model = build_model(cfg)
    model.load_state_dict(_tie_head(sd, cfg.model), strict=not cfg.model.tie_embeddings)
    return (model.to(device) if device is not None else model), cfg
