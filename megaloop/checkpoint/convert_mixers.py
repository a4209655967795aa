"""Conversion of softmax-attention layers into other token mixers (`init.convert_mixers`, LT2 / RADLADS).

    init:
      from: runs/teacher                  # any checkpoint init.from reads
      convert_mixers: "gdn,gdn,gdn,attn"  # or a ratio "3:1"; the looped block's new mixer per layer
    model:
      mixer: "gdn,gdn,gdn,attn"           # must give the same per-layer pattern (validated)

The source's looped block has one mixer per layer (its config's model.mixer); the new run's pattern is
`init.convert_mixers` (the syntax of model.mixer, megaloop.config.mixer_pattern). A layer whose mixer
changes must be softmax attention ("attn") in the source; its mixer is rebuilt as the new one, initialised
from the attention's projections by the rule below. Every other tensor (embedding, prelude, coda, norms,
MLPs, gates, unchanged mixers) is copied as init.from copies it (megaloop.checkpoint.init_weights).

The rule, for a layer converted from attention (n_heads H, n_kv_heads Hkv, head dim hd, group G = H / Hkv):
  swa, dsa  wq, wk, wv, wo (and q_norm, k_norm, the LT2 output gate when the config has them) copied
            unchanged: the same attention with fewer keys per query. With model.window >= seq_len (swa) or
            model.dsa_topk >= seq_len (dsa), the converted model computes exactly the source's function.
            DSA's indexer (wq_index, wk_index, w_index) keeps its own init.
  gdn       W_q (H*hd, d) copied. W_k: GDN has H key heads, so attention's key head j is repeated for the G
            query heads sharing it (GDN head h takes attention kv head h // G, the grouping SDPA's
            enable_gqa uses). W_v likewise, per head, then fitted to GDN's value head dim
            dv = hd * model.gdn_expand_v: the first min(hd, dv) rows of each head come from the attention's
            value head; when dv > hd the extra rows keep GDN's own init and W_o's matching input columns
            are zero (the extra value channels start with no effect on the output but do receive
            gradients); when dv < hd each value head keeps its first dv rows and W_o its first dv columns
            per head. W_o (d, H*hd) copied per head into (d, H*dv) likewise.
            RoPE, q_norm / k_norm and the attention output gate have no counterpart in GDN and are dropped;
            GDN's own parameters (short convs q/k/v_conv, decay A_log / dt_bias / w_a, beta w_b, output
            gate w_gate, output norm out_norm_weight) keep their own init.
"Own init" means the new run's freshly initialised model (train.seed): `converted_init` returns a function
that takes that model's state dict (the trainer passes the initial values one tensor at a time,
megaloop.parallel.materialize.initial_state_dict) and returns the converted state, read per tensor, so a
converted run's new parameters are exactly what a from-scratch run of the same config would start with and
no rank holds the whole source or model.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable, Dict, List, Tuple

import torch

from megaloop.config import ConfigError, ModelConfig, mixer_pattern
from megaloop.config.validation import check_converted_pattern
from megaloop.checkpoint.init_weights import check_state_dict, init_state_dict_source
from megaloop.checkpoint.layout import CheckpointError
from megaloop.checkpoint.lazy_state_dict import LazyStateDict, shape_of

ATTENTION_KEYS = ("wq.weight", "wk.weight", "wv.weight", "wo.weight", "q_norm.weight", "k_norm.weight",
                  "gate.weight")
CONVERTIBLE = ("gdn", "swa", "dsa")


def converted_pattern(spec: str, mc: ModelConfig) -> List[str]:
    """The per-layer mixer names `init.convert_mixers` gives for the looped block of `mc`."""
    try:
        return mixer_pattern(str(spec), mc.n_loop, mc.linear_mixer)
    except ConfigError as exc:
        raise ConfigError(f"init.convert_mixers={spec!r}: {exc}") from None


def _per_head(w: torch.Tensor, heads: int, rows: int) -> torch.Tensor:
    """(heads*hd, d) -> (heads, hd, d) along dim 0."""
    return w.reshape(heads, rows, *w.shape[1:])


def attention_to_gdn(src: Dict[str, torch.Tensor], fresh: Dict[str, torch.Tensor], mc: ModelConfig
                     ) -> Dict[str, torch.Tensor]:
    """One layer's mixer tensors (keys relative to `.mixer.`): attention `src` -> GDN, GDN's own init `fresh`."""
    H, Hkv, hd = mc.n_heads, mc.kv_heads, mc.attn_head_dim
    dv = int(hd * mc.gdn_expand_v)
    n = min(hd, dv)
    kv_of_head = torch.arange(H) // (H // Hkv)
    out = dict(fresh)
    out["wq.weight"] = src["wq.weight"].clone()
    out["wk.weight"] = _per_head(src["wk.weight"], Hkv, hd)[kv_of_head].reshape(H * hd, -1).clone()
    wv = _per_head(fresh["wv.weight"], H, dv).clone()
    wv[:, :n] = _per_head(src["wv.weight"], Hkv, hd)[kv_of_head][:, :n]
    out["wv.weight"] = wv.reshape(H * dv, -1)
    d = src["wo.weight"].shape[0]
    wo = torch.zeros(d, H, dv, dtype=src["wo.weight"].dtype)
    wo[:, :, :n] = src["wo.weight"].reshape(d, H, hd)[:, :, :n]
    out["wo.weight"] = wo.reshape(d, H * dv)
    return out


def convert_state_dict(sd: Dict[str, torch.Tensor], source_names: List[str], target_names: List[str],
                       mc: ModelConfig, fresh: Dict[str, torch.Tensor]) -> "ConvertedStateDict":
    """The run's full state dict: `sd` (checked against the run's model with the source's mixers) with every
    layer whose mixer changes from attention converted (module doc), `fresh` (the run's own init) for the new
    mixers' own parameters. Keys and shapes are exactly `fresh`'s. Read per tensor (a converted layer's mixer
    at once, when one of its tensors is asked for), so neither `sd` nor `fresh` is read whole."""
    return ConvertedStateDict(sd, source_names, target_names, mc, fresh)


class ConvertedStateDict(LazyStateDict):
    def __init__(self, sd, source_names: List[str], target_names: List[str], mc: ModelConfig, fresh):
        super().__init__()
        if len(source_names) != len(target_names):
            raise ConfigError(f"init.convert_mixers names {len(target_names)} looped layers, the source has "
                              f"{len(source_names)}")
        self._sd, self._fresh, self._mc = sd, fresh, mc
        self._rules: Dict[str, str] = {}  # converted layer's mixer prefix -> its new mixer
        keys = {k for k in sd if ".mixer." not in k or not k.startswith("block.layers.")}
        for i, (old, new) in enumerate(zip(source_names, target_names)):
            pre = f"block.layers.{i}.mixer."
            src = {k[len(pre):] for k in sd if k.startswith(pre)}
            own = {k[len(pre):] for k in fresh if k.startswith(pre)}
            if old == new:
                layer = src
            elif old != "attn":
                raise ConfigError(f"init.convert_mixers: looped layer {i} is '{old}' in the source and '{new}' "
                                  f"here; only softmax-attention ('attn') layers convert")
            elif new == "gdn":
                layer = own
            elif new in ("swa", "dsa"):
                layer = own | {k for k in src if k in ATTENTION_KEYS}
            else:
                raise ConfigError(f"init.convert_mixers: no rule converts attention into '{new}' (layer {i}); "
                                  f"rules exist for {', '.join(CONVERTIBLE)}")
            if old != new:
                self._rules[pre] = new
            keys |= {pre + k for k in layer}
        missing, extra = sorted(set(fresh) - keys), sorted(keys - set(fresh))
        if missing or extra:  # (a bug, not a user error: the rules above cover every key)
            raise RuntimeError(f"convert_mixers: missing {missing[:3]}, unexpected {extra[:3]}")
        self._layer = (None, None)  # the last converted layer: (prefix, its tensors)

    def _names(self):
        return list(self._fresh)

    def _shape(self, key):
        return shape_of(self._fresh, key)

    def _converted_layer(self, pre: str) -> Dict[str, torch.Tensor]:
        if self._layer[0] != pre:
            src = {k[len(pre):]: self._sd[k] for k in self._sd if k.startswith(pre)}
            own = {k[len(pre):]: self._fresh[k] for k in self._fresh if k.startswith(pre)}
            if self._rules[pre] == "gdn":
                layer = attention_to_gdn(src, own, self._mc)
            else:  # swa, dsa: the attention's projections, the new mixer's own extras (the DSA indexer)
                layer = dict(own)
                layer.update({k: v for k, v in src.items() if k in ATTENTION_KEYS})
            self._layer = (pre, layer)
        return self._layer[1]

    def _read(self, key):
        pre = key[:key.index(".mixer.") + len(".mixer.")] if ".mixer." in key else None
        value = self._converted_layer(pre)[key[len(pre):]] if pre in self._rules else self._sd[key]
        shape = shape_of(self._fresh, key)
        if tuple(value.shape) != shape:
            raise RuntimeError(f"convert_mixers: {key} converted to {tuple(value.shape)}, needs {shape}")
        dtype = torch.float32 if isinstance(self._fresh, LazyStateDict) else self._fresh[key].dtype
        return value.to(dtype)


def converted_init(path, mc: ModelConfig, spec: str,
                   verify: bool = True) -> Tuple[Callable[[Dict[str, torch.Tensor]], Dict], str]:
    """(fill, note) for a run converting `path`'s attention layers: the source is read and checked now (a
    CheckpointError / ConfigError naming the problem), and `fill(fresh_state_dict)` later returns the run's
    full state dict, `fresh_state_dict` being the run's freshly initialised model (own init of new parts)."""
    sd, src_cfg, source = init_state_dict_source(path, verify)
    sm = src_cfg.model
    check_converted_pattern(spec, mc)
    if sm.n_loop != mc.n_loop:
        raise CheckpointError(f"init.from {source}: the source's looped block has {sm.n_loop} layers "
                              f"(model.n_loop), this run's {mc.n_loop}; conversion keeps the layer count")
    source_names = mixer_pattern(sm.mixer, sm.n_loop, sm.linear_mixer)
    target_names = converted_pattern(spec, mc)
    for i, (old, new) in enumerate(zip(source_names, target_names)):
        if old != new and old != "attn":
            raise ConfigError(f"init.convert_mixers={spec!r}: looped layer {i} is '{old}' in the source "
                              f"{source}, not softmax attention; only 'attn' layers convert (keep '{old}' there)")
        if old != new and new not in CONVERTIBLE:
            raise ConfigError(f"init.convert_mixers={spec!r}: no rule converts attention into '{new}' "
                              f"(layer {i}); rules exist for {', '.join(CONVERTIBLE)}")
    unconverted = dataclasses.replace(mc, mixer=",".join(source_names))
    sd = check_state_dict(sd, unconverted, f"init.from {source}", sm.vocab_size, sm.tie_embeddings)
    changed = [f"{i}:{o}->{n}" for i, (o, n) in enumerate(zip(source_names, target_names)) if o != n]

    def fill(fresh: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        return convert_state_dict(sd, source_names, target_names, mc, fresh)

    note = (f"initialised the weights from {Path(source)}, converting looped layers "
            f"{', '.join(changed) or '(none)'} (weights only: fresh optimizer, step 0)")
    return fill, note
