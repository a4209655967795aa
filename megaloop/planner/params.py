"""Exact parameter counts per (pipeline stage, TP rank), with no memory allocated.

The counts come from the real modules, built the way a run builds them, on the meta device:

  1. LoopedLM(cfg.model) under `torch.device("meta")` (shapes only, no storage);
  2. tensor parallelism applied for TP rank r (`apply_tensor_parallel` with a process-group-free
     `TPComm(None, r, tp)`, the same call `partition_info_for` makes), so every sharded weight has the
     shape rank r holds;
  3. the pipeline layers of `megaloop.parallel.pipeline` built from it (`pipeline_layers`, built as
     DeepSpeed builds a stage's layers), split into stages by the partition the PipelineModule uses
     (`parallel.pipeline_partition`: loop_weighted -> `balanced_partition` over the FLOP weights;
     uniform / parameters -> DeepSpeed's own `partition_uniform` / `partition_balanced`).

A stage holds the parameters of the layers in its range; a tied layer (the tied embedding / head,
DeepSpeed's TiedLayerSpec) exists on every stage that holds one of its layers, so with PP > 1 and
tied embeddings the embedding table is counted on the first and on the last stage (DeepSpeed keeps
a copy on each and all-reduces their gradients).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List

import torch

from megaloop.config import Config
from megaloop.model import build_model
from megaloop.parallel import pipeline as pl
from megaloop.parallel import stage_split
from megaloop.training.optim import muon_parameter


@dataclass
class StageParams:
    stage: int
    tp_rank: int
    layers: List[str]  # pipeline layer names of the stage ("prelude", "loop", ...; repeated per index)
    params: int  # elements of the distinct parameters this (stage, TP rank) holds
    by_layer: Dict[str, int] = field(default_factory=dict)  # "name[i]" -> elements it holds (tied: once)
    names: List[str] = field(default_factory=list)  # LoopedLM parameter names (tied: the first name)
    muon_params: int = 0  # elements of those that train.optimizer=muon gives Muon (optim.muon_parameter)


def meta_model(cfg: Config, tp: int = 1, tp_rank: int = 0):
    """The LoopedLM of `cfg` on the meta device, sharded for TP rank `tp_rank` of `tp` (no memory)."""
    from megaloop.parallel.apply_tp import apply_tensor_parallel
    from megaloop.parallel.comm import TPComm

    with torch.device("meta"):
        lm = build_model(cfg)
    if tp > 1:
        apply_tensor_parallel(lm, TPComm(None, tp_rank, tp), check_replicas=False, force=True)
    return lm


def _collect(cfg: Config) -> bool:
    return cfg.loop.loss != "last"


def built_layers(cfg: Config, lm):
    """[(PipelineLayer, module it uses)] as a stage builds them: a tied layer reuses the first one's."""
    built = pl.build_layers(pl.pipeline_layers(cfg.model, _collect(cfg)), pl.LayerSource(lambda: lm))
    out, tied = [], {}
    for layer, created, fwd in built:
        if created is not None:
            module = created
            if layer.tie_key is not None:
                tied[layer.tie_key] = created
        else:
            module = tied[layer.tie_key]
        out.append((layer, module))
    return out


def _trainable_count(module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def stage_parts(cfg: Config, pp: int, tp: int = 1) -> List[int]:
    """DeepSpeed's `parts` (pp + 1 layer boundaries) for the run's `parallel.pipeline_partition`, as
    `build_pipeline_module` / the PipelineModule computes them."""
    method = cfg.parallel.pipeline_partition
    names = pl.layer_names(cfg.model)
    if method == "loop_weighted":
        return stage_split.balanced_partition(stage_split.layer_flop_weights(cfg, names), pp)
    from deepspeed.runtime import utils as ds_utils

    if method == "uniform":
        return ds_utils.partition_uniform(num_items=len(names), num_parts=pp)
    if method == "parameters":  # DeepSpeed builds each spec alone and counts its trainable parameters
        lm = meta_model(cfg, tp, 0)
        counts = []
        for layer, module in built_layers(cfg, lm):
            counts.append(_trainable_count(module))
        return ds_utils.partition_balanced(weights=counts, num_parts=pp)
    raise ValueError(f"unknown parallel.pipeline_partition {method!r}")


def stage_params(cfg: Config, pp: int = None, tp: int = None) -> List[StageParams]:
    """One StageParams per (stage, TP rank), stage-major. pp / tp default to the config's."""
    pp = cfg.parallel.pipeline_parallel if pp is None else int(pp)
    tp = cfg.parallel.tensor_parallel if tp is None else int(tp)
    parts = stage_parts(cfg, pp, tp)
    out = []
    for r in range(tp):
        lm = meta_model(cfg, tp, r)
        pname = {id(p): n for n, p in lm.named_parameters()}  # named_parameters dedups tied weights
        layers = built_layers(cfg, lm)
        counters = {}
        for s in range(pp):
            seen, by_layer, lnames, pnames, muon = set(), {}, [], [], 0
            for layer, module in layers[parts[s]:parts[s + 1]]:
                i = counters.get(layer.name, 0) if layer.name in ("prelude", "coda") else None
                if i is not None:
                    counters[layer.name] = i + 1
                key = layer.name if i is None else f"{layer.name}[{i}]"
                n = 0
                for p in module.parameters():
                    if id(p) in seen:
                        continue
                    seen.add(id(p))
                    n += p.numel()
                    pnames.append(pname.get(id(p), "?"))
                    muon += p.numel() if muon_parameter(pnames[-1], p) else 0
                by_layer[key] = n
                lnames.append(layer.name)
            out.append(StageParams(s, r, lnames, sum(by_layer.values()), by_layer, pnames, muon))
    out.sort(key=lambda x: (x.stage, x.tp_rank))
    return out


def total_params(cfg: Config) -> int:
    """The one-process model's parameter count (tied weights once)."""
    return meta_model(cfg).num_params()


def largest_param(cfg: Config) -> int:
    """The element count of the model's largest parameter, unsharded (usually the embedding)."""
    return max(p.numel() for p in meta_model(cfg).parameters())
