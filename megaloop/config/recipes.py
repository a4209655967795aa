"""Named model recipes (`model.recipe`): a reference implementation's init and block details as one preset.

A recipe is a set of `model.*` values applied *under* the user's: keys written in the YAML file or given as
`model.key=value` overrides win over the preset. The resolved values are what a run's config.yaml records, so
a saved run reads back the same even if this table changes later (its config names every field explicitly).

- `megaloop`: the library defaults (init std 0.02 everywhere, learned RMSNorm scales, SwiGLU, no QK-norm,
  tied embeddings, no logit soft-cap). Kept as the default so that saved configs, which predate the field,
  load unchanged.
- `flt_reference`: the Fully Looped Transformer repository's `nanochat/gpt.py` (FuRuF-11/FullyLoopedTransformer):
  QK-norm, RMSNorm without a learned scale, ReLU² MLP of width 4d, untied embedding and head, logit soft-cap
  15, nanochat's init (embedding N(0, 1), head N(0, 0.001), q/k/v and MLP input uniform with std 1/sqrt(d),
  attention and MLP output projections zero). It does not rescue the tiny baseline LT at R > 1, which ends at
  the unigram loss under either recipe (docs/looped_models.md section 11).
- `parcae_reference`: Parcae is built on karpathy/nanochat: the same block details and init as
  `flt_reference`, plus nanochat's value embeddings (on in the readable copy of Parcae's code; section 10).
"""
from __future__ import annotations

from typing import Optional

from megaloop.config.schema import ConfigError

_NANOCHAT = {
    "mlp": "relu2",
    "norm_scale": False,
    "qk_norm": True,
    "logit_softcap": 15.0,
    "zero_init_out": True,
    "tie_embeddings": False,
    "embed_norm": True,
    "init_scheme": "nanochat",
}

RECIPES = {
    "megaloop": {},
    "flt_reference": dict(_NANOCHAT),
    "parcae_reference": {**_NANOCHAT, "value_embeddings": True},
}


def recipe_values(name) -> dict:
    """The `model.*` values recipe `name` sets; an unknown name is a ConfigError naming the choices."""
    if name not in RECIPES:
        raise ConfigError(f"model.recipe={name!r} is not a known recipe; choose one of {', '.join(RECIPES)}")
    return dict(RECIPES[name])


def apply_recipe(tree: dict) -> dict:
    """The config tree with `model.recipe`'s values filled in under the keys the user gave (theirs win)."""
    model = tree.get("model")
    if not isinstance(model, dict) or model.get("recipe") in (None, "megaloop"):
        return tree
    return {**tree, "model": {**recipe_values(str(model["recipe"])), **model}}


def collapse_warning(cfg) -> Optional[str]:
    """A one-line warning when the config trains a whole-stack loop without input injection and with a norm
    between loops (the baseline LT, also with LT2's gates or Ouro's norms: `model.normalization: outer`) at R > 1
    on the last loop's loss alone: at tiny scale that ended at the unigram loss under both recipes measured
    (docs/looped_models.md section 11). Without the norm between loops (LT2's loop, `inner`) the same configs
    ended within 0.27 nats of R = 1, and a per-loop loss (Ouro's exit-weighted one, `mean`) kept the outer loop
    off the unigram loss. Studying that baseline is legitimate, so it is not an error."""
    m, lp = cfg.model, cfg.loop
    if (m.arch != "recurrent" or m.injection != "none" or m.normalization != "outer" or lp.loss != "last"
            or max(lp.mean, lp.max if lp.sampling != "fixed" else 1) <= 1):
        return None
    return ("model.arch=recurrent with model.injection=none and model.normalization=outer (the baseline LT) trained "
            "at R > 1 on the last loop's loss collapsed to the unigram loss in megaloop's tiny runs under the megaloop "
            "and flt_reference recipes (docs/looped_models.md section 11); unless you study that baseline, use input "
            "injection (model.injection: add), model.arch: flt, no norm between loops (model.normalization: inner), "
            "or a per-loop loop.loss")
