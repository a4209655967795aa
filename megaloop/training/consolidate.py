"""A training checkpoint -> the one-process LoopedLM (for evaluation, sampling, export).

The reading and merging of DeepSpeed's files (any TP x PP layout, ZeRO 0-3, with checks that name a
missing or mismatched shard) lives in megaloop.export.ds_checkpoint; this module is the training
side's entry point to it.

    python -m megaloop.training.consolidate runs/demo_cpu [out.pt]
"""
from __future__ import annotations

import sys
from typing import Optional, Tuple

import torch

from megaloop.config import Config


def load_full_state_dict(path: str, step: Optional[int] = None) -> Tuple[dict, Config]:
    """(LoopedLM state_dict, resolved config) of the newest complete checkpoint under `path`
    (a run directory, its checkpoints/ folder or one step_NNNNNNNN/ folder), or of `step`."""
    from megaloop.export.ds_checkpoint import checkpoint_config, load_deepspeed_checkpoint
    sd, info = load_deepspeed_checkpoint(path, step)
    return sd, checkpoint_config(info)


def load_model(path: str, device: Optional[str] = None, step: Optional[int] = None):
    """The trained LoopedLM (one process) and its config."""
    from megaloop.model import build_model
    sd, cfg = load_full_state_dict(path, step)
    model = build_model(cfg)
    model.load_state_dict(sd)
    return (model.to(device) if device else model), cfg


if __name__ == "__main__":
    sd, cfg = load_full_state_dict(sys.argv[1])
    out = sys.argv[2] if len(sys.argv) > 2 else None
    print(f"{len(sd)} tensors, {sum(t.numel() for t in sd.values()):,} values")
    if out:
        torch.save({"model": sd, "config": cfg.to_dict()}, out)
        print(f"wrote {out}")
