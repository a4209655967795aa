"""Token mixers: the pluggable part of a transformer layer.

A mixer is an `nn.Module` built as `Mixer(cfg, layer_idx)` and called as
`mixer(x, rope, q_input=None, cache=None) -> y`, with x already normalised, shape (B, T, d) in and
out. `q_input`, when given, is the (normalised) stream the queries come from (FLT's attention
injection). `cache` is a dict owned by the caller for one forward pass, in which a mixer may keep
state across loop iterations (e.g. a linear-attention state carried from one loop to the next).

New mixers register here by name; the loop code never changes when one is added.
"""
from __future__ import annotations

from typing import Callable, Dict, List

from megaloop.config import ConfigError, ModelConfig

MIXERS: Dict[str, Callable] = {}


def register_mixer(name: str):
    def wrap(cls):
        MIXERS[name] = cls
        return cls
    return wrap


def build_mixer(name: str, cfg: ModelConfig, layer_idx: int = 0):
    if name not in MIXERS:
        raise ConfigError(f"unknown mixer '{name}' in model.mixer; known mixers: {sorted(MIXERS)}")
    return MIXERS[name](cfg, layer_idx)


def mixer_pattern(spec: str, n_layers: int, linear_mixer: str = "gdn") -> List[str]:
    """Mixer name for each of n_layers layers.

    `spec` is one name ("attn"), a comma list ("gdn,gdn,gdn,attn") repeated along depth (its length
    must divide n_layers so the pattern tiles the block exactly), or a ratio "N:M": N layers of
    `linear_mixer` then M softmax-attention layers, repeated (LT2's "4:1" hybrid puts one full
    attention layer after every four linear ones).
    """
    if ":" in spec:
        try:
            n_lin, n_attn = (int(v) for v in spec.split(":"))
        except ValueError:
            raise ConfigError(f"model.mixer ratio {spec!r} must look like 'N:M' with integers") from None
        if n_lin < 0 or n_attn < 0 or n_lin + n_attn == 0:
            raise ConfigError(f"model.mixer ratio {spec!r} needs non-negative counts, not both zero")
        spec = ",".join([linear_mixer] * n_lin + ["attn"] * n_attn)
    names = [s.strip() for s in spec.split(",") if s.strip()]
    if not names:
        raise ConfigError("model.mixer is empty")
    if n_layers % len(names):
        raise ConfigError(f"model.mixer pattern {spec!r} has {len(names)} entries, which does not tile "
                          f"the {n_layers} layers it applies to")
    for n in names:
        if n not in MIXERS:
            raise ConfigError(f"unknown mixer '{n}' in model.mixer={spec!r}; known mixers: {sorted(MIXERS)}")
    return names * (n_layers // len(names))


def _register_builtin():
    from megaloop.model.layers import Attention
    from megaloop.model.gated_deltanet import GatedDeltaNet
    from megaloop.model.sparse_attention import DeepSeekSparseAttention, SlidingWindowAttention

    MIXERS.setdefault("attn", Attention)
    MIXERS.setdefault("gdn", GatedDeltaNet)
    MIXERS.setdefault("swa", SlidingWindowAttention)
    MIXERS.setdefault("dsa", DeepSeekSparseAttention)


_register_builtin()
