"""What an export reads and checks before anything is written.

- the checkpoint seam: `load_checkpoint` / `load_merged_state_dict` / `load_checkpoint_config` read a
  megaloop/DeepSpeed training checkpoint of any TP x PP x DP layout and ZeRO stage, or a plain
  `torch.save`d state dict, through megaloop.checkpoint (its CheckpointError becomes ExportError here);
- the model config (`_model_config`: a Config, ModelConfig or their dict form);
- the state dict against the config (`check_state_dict`) and the looped layers' token mixers against
  what the Hugging Face modeling file implements (`unsupported_mixers`).
"""
from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Dict, Optional, Union

import torch

from megaloop import checkpoint as ckpt
from megaloop.checkpoint import expected_shapes
from megaloop.config import Config, ModelConfig, config_from_dict
from megaloop.errors import MegaloopError


class ExportError(MegaloopError, ValueError):
    """The input cannot be exported as asked; the message says what is wrong. Nothing was written."""


# ------------------------------------------------------------------------------------------------
# Model config and state dict validation


def _model_config(config: Union[Config, ModelConfig, dict]) -> ModelConfig:
    if isinstance(config, Config):
        return config.model
    if isinstance(config, ModelConfig):
        return config
    if isinstance(config, dict):  # a saved Config tree or a bare model section
        tree = config if "model" in config else {"model": config}
        return config_from_dict({"model": tree["model"]}).model
    raise ExportError(f"model_config must be a megaloop Config or ModelConfig, got {type(config).__name__}")


def check_state_dict(state_dict: Dict[str, torch.Tensor], mc: ModelConfig) -> None:
    """Raise ExportError naming every missing, unexpected, mis-shaped or non-finite entry."""
    if not isinstance(state_dict, Mapping) or not state_dict:  # (a dict, or megaloop.checkpoint's lazy ones)
        raise ExportError("the state dict is empty or not a dict")
    expected = expected_shapes(mc)
    optional = {"head.weight"} if mc.tie_embeddings else set()
    problems = []
    missing = sorted(k for k in expected if k not in state_dict and k not in optional)
    extra = sorted(k for k in state_dict if k not in expected)
    if missing:
        problems.append(f"{len(missing)} missing key(s): {', '.join(missing[:12])}{' ...' if len(missing) > 12 else ''}")
    if extra:
        problems.append(f"{len(extra)} unexpected key(s): {', '.join(extra[:12])}{' ...' if len(extra) > 12 else ''}")
    for k, shape in expected.items():
        v = state_dict.get(k)
        if v is None:
            continue
        if not torch.is_tensor(v):
            problems.append(f"{k}: not a tensor ({type(v).__name__})")
        elif tuple(v.shape) != shape:
            problems.append(f"{k}: shape {tuple(v.shape)}, the config needs {shape} (a shard not merged, or a "
                            f"checkpoint from another config?)")
        elif not v.is_floating_point():
            problems.append(f"{k}: dtype {v.dtype}, expected a floating-point tensor")
        elif not bool(torch.isfinite(v).all()):
            problems.append(f"{k}: contains NaN or inf")
    if mc.tie_embeddings and not problems and "head.weight" in state_dict:
        if not torch.equal(state_dict["head.weight"], state_dict["embedding.weight"]):
            problems.append("head.weight differs from embedding.weight, but model.tie_embeddings=true")
    if problems:
        raise ExportError("the state dict does not match the model config:\n  - " + "\n  - ".join(problems))


def loop_mixers(mc: ModelConfig) -> list:
    """The token mixer of each looped layer, resolved by megaloop's own pattern rules (comma lists,
    "N:M" ratios)."""
    from megaloop.config import mixer_pattern

    if hasattr(mc, "linear_mixer"):
        return mixer_pattern(mc.mixer, mc.n_loop, mc.linear_mixer)
    return mixer_pattern(mc.mixer, mc.n_loop)


def unsupported_mixers(mc: ModelConfig) -> list:
    """Mixers of this config that the Hugging Face modeling file does not implement (yet)."""
    from megaloop.export.hf_template.modeling_megaloop import MIXERS

    return sorted(set(loop_mixers(mc)) - set(MIXERS))


def _check_exportable(mc: ModelConfig) -> None:
    from megaloop.export.hf_template.modeling_megaloop import MIXERS

    if not getattr(mc, "causal", True):
        raise ExportError("model.causal=false: the Hugging Face export is a causal LM (KV cache, generation) and has "
                          "no bidirectional attention; evaluate this model from its checkpoint (tools/eval_loops.py "
                          "reads checkpoints). Nothing was written.")
    unknown = unsupported_mixers(mc)
    if unknown:
        raise ExportError(f"model.mixer={mc.mixer!r}: the Hugging Face modeling file has no implementation of "
                          f"the token mixer(s) {unknown} yet (it has {sorted(MIXERS)}); add them to MIXERS in "
                          f"megaloop/export/hf_template/modeling_megaloop.py first. Nothing was written.")


# ------------------------------------------------------------------------------------------------
# Checkpoint seam


@contextlib.contextmanager
def _as_export_error():
    try:
        yield
    except ckpt.CheckpointError as e:
        raise ExportError(str(e)) from e


def load_merged_state_dict(checkpoint_dir, step: Optional[int] = None) -> Dict[str, torch.Tensor]:
    """The full megaloop state dict of a checkpoint, merged across tensor/pipeline-parallel shards.

    checkpoint_dir:
      * a megaloop/DeepSpeed training checkpoint: the run's output_dir, its checkpoints/ root (`latest`
        or the newest complete step_NNNNNNNN/ is read; `step` picks step_{step:08d}) or one tag
        directory (megaloop.checkpoint.resolve). Any TP x PP x DP layout and ZeRO 0-3. Only complete
        tags (megaloop_complete.json) are read; a missing or mis-shaped shard raises ExportError naming
        the file.
      * a plain `torch.save`d state dict (or a dict holding it under "model" / "state_dict" /
        "module"), given as a file or a directory with model.pt (or step_N/model.pt).
    """
    with _as_export_error():
        return ckpt.load_state_dict(checkpoint_dir, step)


def load_checkpoint_config(checkpoint_dir, step: Optional[int] = None) -> Config:
    """The run config of a checkpoint: for a megaloop/DeepSpeed checkpoint the resolved config stored
    in its client state (with the tokenizer reference stored beside it); for a plain file a 'config'
    entry in it, else config.yaml next to it (or in its parent directory)."""
    with _as_export_error():
        return ckpt.load_config(checkpoint_dir, step)


def load_checkpoint(checkpoint_dir, step: Optional[int] = None, verify: bool = True):
    """(merged state dict, Config, tokenizer spec) of a checkpoint: the inputs of export_hf. The
    tokenizer spec is the run's DataConfig (tokenizer_type, tokenizer_model). verify: check the tag's
    checksums first (megaloop.checkpoint.integrity)."""
    with _as_export_error():
        sd, cfg = ckpt.load(checkpoint_dir, step, verify)
    return sd, cfg, cfg.data
