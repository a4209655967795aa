"""Read a megaloop/DeepSpeed training checkpoint (any TP x PP x DP layout, ZeRO 0-3) as the one-process
LoopedLM state dict, offline (no process group, no DeepSpeed engine).

What megaloop/training writes (see megaloop/training/checkpoint.py) under `<output_dir>/checkpoints/`:

    latest                                    the newest complete tag (text)
    step_00000100/
        megaloop_complete.json                completeness marker (written after every rank's files)
        mp_rank_MM_model_states.pt            one per model-parallel rank MM < PP x TP (DP rank 0 writes);
                                              DeepSpeed's client state: "config" (the resolved run
                                              config), "tokenizer", "step", ... and, with PP = 1 and
                                              ZeRO 0-2, "module" = LoopedLM.state_dict() of TP rank MM
        layer_LL-model_TT-model_states.pt     PP > 1: pipeline layer LL of TP rank TT (keys are already
                                              LoopedLM names: the pipeline layer classes keep them)
        zero_pp_rank_D_mp_rank_MM_model_states.pt, *optim_states.pt
                                              ZeRO-3 (PP = 1, TP = 1): the module holds empty
                                              placeholders; the weights live in the optimizer
                                              partitions (DeepSpeed's zero_to_fp32 reassembles them)
        rng_rankNNNNN.pt                      (not needed here)

Pipeline layers (megaloop/parallel/pipeline.py): embedding [tied], embed norm, prelude i ..., the looped
block (one layer), coda j ..., final norm, head. The tied head (TiedLayerSpec with a forward_fn) is not
a module on its stage, so DeepSpeed writes no file for it: the embedding file (layer 00) holds
`embedding.weight` and `head.weight`. `pipeline_layer_keys(model_config)` derives which keys each
layer file must hold by building the very layer classes of pipeline.py on a meta-device LoopedLM.

TP shards are merged with megaloop.parallel.apply_tp.merge_tp_shards / partition_info_for (the
partition convention is documented there). Every file and every shard shape is checked before
merging; a missing or mismatched file raises ExportError naming it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import re
import warnings
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

from megaloop.config import Config, ConfigError, config_from_dict

COMPLETE = "megaloop_complete.json"  # = megaloop.training.checkpoint.COMPLETE
_TAG_RE = re.compile(r"^step_(\d+)$")
_MODEL_STATES = ("mp_rank_*_model_states.pt", "layer_*-model_states.pt", "zero_pp_rank_*_model_states.pt",
                 "*zero_pp_rank_*_optim_states.pt")


def _error(msg: str):
    from megaloop.export.hf_export import ExportError

    return ExportError(msg)


# ------------------------------------------------------------------------------------------------
# Finding the tag directory


def _has_model_states(d: Path) -> bool:
    return d.is_dir() and any(any(d.glob(p)) for p in _MODEL_STATES)


def is_deepspeed_checkpoint(path) -> bool:
    """A run directory (with checkpoints/), a checkpoint root (latest, step_N/, global_stepN/) or one
    tag directory holding DeepSpeed model-state files."""
    path = Path(path)
    if not path.is_dir():
        return False
    for root in (path, path / "checkpoints"):
        if not root.is_dir():
            continue
        if (root / "latest").is_file() or (root / COMPLETE).is_file() or _has_model_states(root):
            return True
        for d in root.iterdir():
            if d.is_dir() and (_TAG_RE.match(d.name) or d.name.startswith("global_step")) and \
                    ((d / COMPLETE).is_file() or _has_model_states(d)):
                return True
    return False


def _tags(root: Path) -> List[Tuple[int, Path]]:
    out = []
    for d in root.iterdir() if root.is_dir() else ():
        m = _TAG_RE.match(d.name)
        if m and d.is_dir():
            out.append((int(m.group(1)), d))
    return sorted(out)


def resolve_tag_dir(path, step: Optional[int] = None) -> Path:
    """The (complete) tag directory to read: `path` is a tag directory, a checkpoint root or a run
    directory with checkpoints/. Without `step`: the tag named by `latest` (it names complete tags
    only), else the newest complete tag. A tag without the completeness marker is refused."""
    path = Path(path)
    if not path.exists():
        raise _error(f"checkpoint {path} does not exist")
    if _has_model_states(path) or (path / COMPLETE).is_file() or _TAG_RE.match(path.name):
        tag_dir = path  # one tag directory
        if not (tag_dir / COMPLETE).is_file():
            raise _error(f"checkpoint {tag_dir} is incomplete: it has no {COMPLETE} (its save was interrupted, "
                         f"or it was not written by megaloop); export a complete step instead")
        if step is not None:
            written = _marker(tag_dir).get("step")
            if written is not None and int(written) != step:
                raise _error(f"--step {step} was given but {tag_dir} holds step {written}")
        return tag_dir
    root = path / "checkpoints" if (path / "checkpoints").is_dir() and not (path / "latest").is_file() \
        and not _tags(path) else path
    tags = _tags(root)
    if step is not None:
        tag_dir = root / f"step_{step:08d}"
        if not tag_dir.is_dir():
            have = ", ".join(str(s) for s, _ in tags) or "none"
            raise _error(f"no step {step} in {root} (looked for {tag_dir.name}/; steps there: {have})")
        if not (tag_dir / COMPLETE).is_file():
            raise _error(f"checkpoint {tag_dir} is incomplete: it has no {COMPLETE} (its save was "
                         f"interrupted); export a complete step instead")
        return tag_dir
    latest = root / "latest"
    if latest.is_file():
        tag = latest.read_text().strip()
        if (root / tag / COMPLETE).is_file():
            return root / tag
    complete = [d for _, d in tags if (d / COMPLETE).is_file()]
    if complete:
        return complete[-1]
    others = sorted(d.name for d in root.iterdir() if d.is_dir()) if root.is_dir() else []
    raise _error(f"no complete checkpoint in {root}: no tag directory has {COMPLETE} "
                 f"(directories there: {', '.join(others) or 'none'}; an interrupted save leaves none)")


def _marker(tag_dir: Path) -> dict:
    try:
        return json.loads((tag_dir / COMPLETE).read_text())
    except (OSError, ValueError):
        return {}


# ------------------------------------------------------------------------------------------------
# Layout


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


def _load(path: Path):
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - a truncated / foreign file: name it
        raise _error(f"cannot read {path}: {type(e).__name__}: {e}") from e


def read_info(tag_dir: Path) -> CheckpointInfo:
    """The run config, tokenizer reference and parallel layout stored with a tag (one small file read)."""
    candidates = sorted(tag_dir.glob("mp_rank_*_model_states.pt")) + \
        sorted(tag_dir.glob("zero_pp_rank_*_mp_rank_*_model_states.pt"))
    if not candidates:
        raise _error(f"{tag_dir} holds no DeepSpeed model states (mp_rank_00_model_states.pt, or "
                     f"zero_pp_rank_0_mp_rank_00_model_states.pt for ZeRO-3); the checkpoint is incomplete")
    meta_file = candidates[0]
    meta = _load(meta_file)
    if not isinstance(meta, dict) or not isinstance(meta.get("config"), dict):
        raise _error(f"{meta_file} has no 'config' in its client state: not a megaloop training checkpoint")
    try:
        cfg = config_from_dict(meta["config"])
    except ConfigError as e:
        raise _error(f"{meta_file}: the run config saved in the checkpoint is invalid: {e}") from e
    dims = meta.get("checkpoint_parallel_dimensions") or {}
    pp = int(dims.get("pp_degree", cfg.parallel.pipeline_parallel))
    tp = int(dims.get("tp_degree", cfg.parallel.tensor_parallel))
    if (pp, tp) != (cfg.parallel.pipeline_parallel, cfg.parallel.tensor_parallel):
        raise _error(f"{meta_file}: DeepSpeed recorded pp={pp}, tp={tp} but the saved config says "
                     f"pipeline_parallel={cfg.parallel.pipeline_parallel}, tensor_parallel="
                     f"{cfg.parallel.tensor_parallel}")
    zero = int(((meta.get("ds_config") or {}).get("zero_optimization") or {}).get("stage", cfg.parallel.zero_stage))
    tok = meta.get("tokenizer") or {"type": cfg.data.tokenizer_type, "model": cfg.data.tokenizer_model}
    step = _marker(tag_dir).get("step", meta.get("step"))
    return CheckpointInfo(tag_dir, None if step is None else int(step), cfg, dict(tok), pp, tp,
                          int(meta.get("dp_world_size") or 1), zero, meta_file)


def pipeline_layer_keys(model_config) -> List[Tuple[str, Optional[List[str]]]]:
    """Per DeepSpeed pipeline layer index: (layer name, the LoopedLM state-dict keys its file holds), or
    (name, None) for the tied head, which has no file. Built from megaloop/parallel/pipeline.py's layer
    classes on a meta-device LoopedLM, in the order build_pipeline_module lists its specs."""
    from megaloop.model import LoopedLM
    from megaloop.parallel import pipeline as pl

    mc = model_config
    with torch.device("meta"):
        lm = LoopedLM(mc)
    src = pl._Source(lambda: lm)
    tied = mc.tie_embeddings
    layers = [("embedding", pl.EmbeddingPipe(src) if tied else pl.EmbeddingPipe(src, False)),
              ("embed_norm", pl.EmbedNormPipe(src))]
    layers += [("prelude", pl.PreludeLayerPipe(src, i)) for i in range(mc.n_prelude)]
    layers.append(("loop", pl.LoopedBlockPipe(src, False)))
    layers += [("coda", pl.CodaLayerPipe(src, j)) for j in range(mc.n_coda)]
    layers.append(("final_norm", pl.FinalNormPipe(src)))
    layers.append(("head", None if tied else pl.HeadPipe(src)))
    names = pl.layer_names(mc)
    if [n for n, _ in layers] != names:
        raise RuntimeError(f"megaloop.export.ds_checkpoint.pipeline_layer_keys is out of date with "
                           f"megaloop/parallel/pipeline.py (layers {names})")
    return [(n, None if m is None else list(m.state_dict().keys())) for n, m in layers]


def _shard_shapes(mc, tp: int) -> Tuple[Dict[str, Tuple[int, ...]], Dict[str, object]]:
    from megaloop.export.hf_export import expected_shapes

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
    if not isinstance(sd, dict):
        raise _error(f"{f}: not a state dict ({type(sd).__name__}); {what}")
    got, want = set(sd), set(want_keys)
    problems = []
    if want - got:
        problems.append(f"missing {', '.join(sorted(want - got)[:8])}")
    if got - want:
        problems.append(f"unexpected {', '.join(sorted(got - want)[:8])}")
    for k in sorted(want & got):
        v = sd[k]
        if not torch.is_tensor(v):
            problems.append(f"{k} is not a tensor")
        elif tuple(v.shape) != shapes[k]:
            problems.append(f"{k} has shape {tuple(v.shape)}, expected {shapes[k]}")
    if problems:
        raise _error(f"{f} ({what}) does not match the run config: " + "; ".join(problems)
                     + ". Was the file replaced, or written by another run/layout?")
    return {k: sd[k] for k in want_keys}


def _require(files: List[Tuple[Path, str]], tag_dir: Path) -> None:
    missing = [(f, what) for f, what in files if not f.is_file()]
    if missing:
        listing = "; ".join(f"{f.name} ({what})" for f, what in missing[:6])
        more = f" and {len(missing) - 6} more" if len(missing) > 6 else ""
        raise _error(f"checkpoint {tag_dir} is missing {len(missing)} file(s): {listing}{more}. The checkpoint "
                     f"is damaged (a shard deleted or not copied); nothing was written")


def _merge(shards: List[Dict[str, torch.Tensor]], info, files: List[str]) -> Dict[str, torch.Tensor]:
    if len(shards) == 1:
        return dict(shards[0])
    from megaloop.parallel.apply_tp import merge_tp_shards

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
    return merge_tp_shards(shards, info)


def _load_pipeline(ci: CheckpointInfo) -> Dict[str, torch.Tensor]:
    mc, tp, d = ci.config.model, ci.tp, ci.tag_dir
    layers = pipeline_layer_keys(mc)
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
        raise _error(f"{d} has pipeline layer files the run config does not have ({', '.join(stray)}): "
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
                raise _error(f"{f}: {sorted(dup)[:4]} also appear in an earlier layer file")
            sd.update(part)
        shards.append(sd)
        names.append(f"tensor-parallel rank {t}")
    return _merge(shards, info, names)


def _load_pp1(ci: CheckpointInfo) -> Dict[str, torch.Tensor]:
    mc, tp, d = ci.config.model, ci.tp, ci.tag_dir
    from megaloop.export.hf_export import expected_shapes

    files = [d / f"mp_rank_{t:02d}_model_states.pt" for t in range(tp)]
    _require([(f, f"tensor-parallel rank {t} of {tp}") for t, f in enumerate(files)], d)
    shapes, info = _shard_shapes(mc, tp)
    keys = list(expected_shapes(mc))
    shards = []
    for t, f in enumerate(files):
        obj = _load(f)
        module = obj.get("module") if isinstance(obj, dict) else None
        if not isinstance(module, dict):
            raise _error(f"{f} has no model weights under 'module' (got {type(module).__name__})")
        optional = {"head.weight"} if mc.tie_embeddings and "head.weight" not in module else set()
        shards.append(_check_shard(module, f, [k for k in keys if k not in optional], shapes,
                                   f"tensor-parallel rank {t} of {tp}"))
    return _merge(shards, info, [f.name for f in files])


def _load_zero3(ci: CheckpointInfo) -> Dict[str, torch.Tensor]:
    d = ci.tag_dir
    if ci.tp != 1 or ci.pp != 1:
        raise _error(f"{d}: ZeRO-3 with tensor_parallel={ci.tp}, pipeline_parallel={ci.pp} is not a layout "
                     f"megaloop trains")
    expected = []
    for r in range(ci.dp):
        expected.append((d / f"zero_pp_rank_{r}_mp_rank_00_model_states.pt", f"ZeRO-3 data-parallel rank {r}"))
    _require(expected, d)
    for r in range(ci.dp):
        if not list(d.glob(f"*zero_pp_rank_{r}_mp_rank_00_optim_states.pt")):
            raise _error(f"checkpoint {d} is missing zero_pp_rank_{r}_mp_rank_00_optim_states.pt (ZeRO-3 "
                         f"data-parallel rank {r} of {ci.dp}: it holds that rank's partition of the weights)")
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log):
            sd = get_fp32_state_dict_from_zero_checkpoint(str(d.parent), tag=d.name)
    except Exception as e:  # noqa: BLE001
        raise _error(f"{d}: DeepSpeed's zero_to_fp32 could not reassemble the ZeRO-3 weights: "
                     f"{type(e).__name__}: {e}\n{log.getvalue()[-2000:]}") from e
    sd = {k: v for k, v in sd.items()}
    from megaloop.export.hf_export import expected_shapes

    shapes = expected_shapes(ci.config.model)
    keys = [k for k in shapes if k in sd or not (k == "head.weight" and ci.config.model.tie_embeddings)]
    return _check_shard(sd, d, keys, shapes, f"ZeRO-3 weights of {ci.dp} data-parallel rank(s)")


def load_deepspeed_checkpoint(path, step: Optional[int] = None):
    """(state dict with LoopedLM names, CheckpointInfo). Raises ExportError naming the file on a
    missing, incomplete or mismatched checkpoint."""
    tag_dir = resolve_tag_dir(path, step)
    ci = read_info(tag_dir)
    if ci.pp > 1:
        sd = _load_pipeline(ci)
    elif ci.zero_stage == 3:
        sd = _load_zero3(ci)
    else:
        sd = _load_pp1(ci)
    if ci.config.model.tie_embeddings and "head.weight" not in sd and "embedding.weight" in sd:
        sd["head.weight"] = sd["embedding.weight"]
    return sd, ci


def checkpoint_config(ci: CheckpointInfo) -> Config:
    """The run config with the tokenizer reference stored in the checkpoint."""
    cfg = ci.config
    tok = ci.tokenizer
    if tok.get("type"):
        cfg.data.tokenizer_type = tok["type"]
        cfg.data.tokenizer_model = tok.get("model")
    return cfg
