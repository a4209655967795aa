"""A training checkpoint -> the one-process LoopedLM state_dict (for export, evaluation, sampling).

Reads DeepSpeed's files directly (no process group): with PP = 1 the model file
`mp_rank_XX_model_states.pt` ("module" holds LoopedLM's state_dict, one file per TP rank); with PP > 1
the per-layer files `layer_LL-model_XX-model_states.pt`, whose keys are already LoopedLM's names (the
pipeline layers keep them, see megaloop/parallel/pipeline.py). TP shards are merged with
megaloop.parallel.apply_tp.merge_tp_shards. The resolved config comes from the checkpoint's client
state. Weights are as the engine holds them (bf16 runs: bf16 module weights).

    python -m megaloop.training.consolidate runs/demo_cpu/checkpoints [out.pt]
"""
from __future__ import annotations

import glob
import os
import re
import sys
from typing import Optional, Tuple

import torch

from megaloop.config import Config, config_from_dict


def _load(path):
    return torch.load(path, map_location="cpu", weights_only=False)


def resolve(path: str) -> str:
    """A tag directory, or a checkpoint root (its newest complete tag)."""
    from megaloop.training.checkpoint import find_checkpoint
    found = find_checkpoint(path)
    if found is None:
        raise FileNotFoundError(f"no complete checkpoint under {path}")
    return os.path.join(*found)


def load_full_state_dict(path: str) -> Tuple[dict, Config]:
    tag_dir = resolve(path)
    model_files = sorted(glob.glob(os.path.join(tag_dir, "mp_rank_*_model_states.pt")))
    if not model_files:
        raise FileNotFoundError(f"{tag_dir} has no DeepSpeed model states")
    meta = _load(model_files[0])
    if "config" not in meta:
        raise ValueError(f"{tag_dir} was not written by megaloop (no config in its client state)")
    cfg = config_from_dict(meta["config"])
    if cfg.parallel.zero_stage == 3:
        raise ValueError("ZeRO-3 checkpoints hold partitioned parameters; use DeepSpeed's zero_to_fp32.py first")
    layer_files = glob.glob(os.path.join(tag_dir, "layer_*-model_*-model_states.pt"))
    shards = {}
    if layer_files:
        for f in sorted(layer_files):
            tp_rank = int(re.search(r"-model_(\d+)-model_states", f).group(1))
            shards.setdefault(tp_rank, {}).update(_load(f))
    else:
        for f in model_files:
            tp_rank = int(re.search(r"mp_rank_(\d+)_model_states", f).group(1))
            shards[tp_rank] = dict(meta["module"] if f == model_files[0] else _load(f)["module"])
    ordered = [shards[r] for r in sorted(shards)]
    if len(ordered) == 1:
        full = ordered[0]
    else:
        from megaloop.parallel.apply_tp import merge_tp_shards, partition_info_for
        full = merge_tp_shards(ordered, partition_info_for(cfg.model, len(ordered)))
    return full, cfg


def load_model(path: str, device: Optional[str] = None):
    """The trained LoopedLM (one process) from a checkpoint."""
    from megaloop.model import build_model
    sd, cfg = load_full_state_dict(path)
    model = build_model(cfg)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not (k == "head.weight" and cfg.model.tie_embeddings)]
    if missing or unexpected:
        raise ValueError(f"checkpoint does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model.to(device) if device else model, cfg


if __name__ == "__main__":
    sd, cfg = load_full_state_dict(sys.argv[1])
    out = sys.argv[2] if len(sys.argv) > 2 else None
    print(f"{len(sd)} tensors, {sum(t.numel() for t in sd.values()):,} values")
    if out:
        torch.save({"model": sd, "config": cfg.to_dict()}, out)
        print(f"wrote {out}")
