"""The run config saved in a checkpoint, read back so that it rebuilds the model that was saved.

A field added to megaloop after a checkpoint was written gets its default when the saved config is read;
where that default builds a different model than the saved one, `saved_config_from_dict` gives the field
the value the checkpoint was trained with instead:

- `model.dsa_indexer_form`: checkpoints from before it trained the "legacy" DSA indexer (no RoPE, no
  LayerNorm on k_I, no d_I^-1/2); read with the default "v3.2" they would miss `k_index_norm` weights.
  A run resuming such a checkpoint with the default is then refused by the resume policy, naming
  `model.dsa_indexer_form` ('legacy' in the checkpoint): set model.dsa_indexer_form=legacy to continue it.
"""
from __future__ import annotations

import copy

from megaloop.config import Config, config_from_dict


def _uses_dsa(model: dict) -> bool:
    return "dsa" in str(model.get("mixer", "")) or str(model.get("linear_mixer", "")) == "dsa"


def saved_config_from_dict(data: dict) -> Config:
    tree = copy.deepcopy(data)
    model = tree.get("model") if isinstance(tree, dict) else None
    if isinstance(model, dict) and "dsa_indexer_form" not in model and _uses_dsa(model):
        model["dsa_indexer_form"] = "legacy"
    return config_from_dict(tree)
