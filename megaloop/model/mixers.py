"""Token mixers: the pluggable part of a transformer layer.

A mixer is an `nn.Module` built as `Mixer(cfg, layer_idx)` and called as
`mixer(x, rope, q_input=None) -> y`, with x already normalised, shape (B, T, d) in and out. `q_input`,
when given, is the (normalised) stream the queries come from (FLT's attention injection).

New mixers register here by name (`@register_mixer("name")`); the loop code never changes when one is
added. Which mixer each looped layer gets is `megaloop.config.mixer_pattern` (model.mixer).
"""
from __future__ import annotations

from typing import Callable, Dict

from megaloop.config import MIXER_NAMES, ConfigError, ModelConfig
from megaloop.config.validation import noncausal_problem
from megaloop.model.gated_deltanet import GatedDeltaNet
from megaloop.model.layers import Attention
from megaloop.model.sparse_attention import DeepSeekSparseAttention, SlidingWindowAttention

MIXERS: Dict[str, Callable] = {"attn": Attention, "gdn": GatedDeltaNet, "swa": SlidingWindowAttention,
                               "dsa": DeepSeekSparseAttention}


def register_mixer(name: str):
    """Class decorator: make `name` usable in model.mixer (also in configs validated afterwards)."""
    def wrap(cls):
        MIXERS[name] = cls
        MIXER_NAMES.add(name)
        return cls
    return wrap


def build_mixer(name: str, cfg: ModelConfig, layer_idx: int = 0):
    if name not in MIXERS:
        raise ConfigError(f"unknown mixer '{name}' in model.mixer; known mixers: {sorted(MIXERS)}")
    if not getattr(cfg, "causal", True) and name != "attn":
        raise ConfigError(noncausal_problem(cfg) or f"model.causal=false: mixer {name!r} is causal by construction")
    return MIXERS[name](cfg, layer_idx)
