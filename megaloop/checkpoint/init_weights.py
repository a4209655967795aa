"""Weights-only initialisation of a new run (`init.from` in the config).

    sd, note = init_state_dict(path, cfg.model)    # the source's weights, checked against this model

`path` is anything megaloop.checkpoint.reader reads: a run folder, a checkpoint root or one tag folder
(resolved with layout.resolve: the newest complete tag), of any TP x PP x DP x ZeRO layout, or a plain
checkpoint (model.safetensors / model.pt + config, e.g. what tools/import_hf.py writes). The state dict returned has
exactly the keys and shapes of LoopedLM(mc).state_dict(); the trainer loads it into the full model on
every rank before tensor parallelism shards it, the pipeline splits it and DeepSpeed wraps it, so it
lands in any layout of the new run. The optimizer is built afresh afterwards and the run starts at
step 0 (train.load / auto-resume, in contrast, continue a run: weights, optimizer, step, data).

Checked, each a one-line CheckpointError naming the key: a tensor this model needs that the source
lacks, a source tensor this model has no place for, a shape that differs. The one difference forgiven:
the vocabulary padding rows of `embedding.weight` / `head.weight` (model.pad_vocab_multiple, which a
TP degree may change), when both sides have the same real vocabulary: padded rows never see a token,
so they are cut or zero-filled. A tied source gives an untied model its head (= the embedding); an
untied source whose head differs from its embedding cannot initialise a tied model.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Tuple

import torch

from megaloop.checkpoint.layout import CheckpointError, is_deepspeed_checkpoint, resolve
from megaloop.checkpoint.lazy_state_dict import LazyStateDict, shape_of, tie
from megaloop.checkpoint.plain import plain_file
from megaloop.checkpoint.reader import expected_shapes, load
from megaloop.config import ModelConfig

VOCAB_KEYS = ("embedding.weight", "head.weight")


def _refuse(path, what: str) -> CheckpointError:
    return CheckpointError(f"init.from {path}: {what}")


def fit_vocab_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    """`t` with `rows` rows: padding rows cut, or zero rows appended."""
    if t.shape[0] >= rows:
        return t[:rows].clone()
    return torch.cat([t, t.new_zeros((rows - t.shape[0],) + tuple(t.shape[1:]))])


def check_state_dict(sd: Dict[str, torch.Tensor], mc: ModelConfig, where: str, source_vocab: int = None,
                     source_tied: bool = None) -> Dict[str, torch.Tensor]:
    """`sd` made to match LoopedLM(mc).state_dict() key for key (vocab padding fitted, a tied head
    filled in), or CheckpointError(f"{where}: ...") naming the first offending key."""
    expected = expected_shapes(mc)
    sd = sd.copy() if isinstance(sd, LazyStateDict) else dict(sd)  # (a lazy state dict: nothing read here)
    if "head.weight" not in sd and "embedding.weight" in sd and source_tied is not False:
        tie(sd, "head.weight", "embedding.weight")
    missing = [k for k in expected if k not in sd]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"{where}: no tensor '{missing[0]}'{more}, which this run's model needs: the "
                              f"source was trained with another architecture (compare its config's model section)")
    unknown = [k for k in sd if k not in expected]
    if unknown:
        more = f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""
        raise CheckpointError(f"{where}: tensor '{unknown[0]}'{more} has no place in this run's model (model "
                              f"section differs from the source's: layer counts, mixers, gates?)")
    out = sd  # (every key expected, none unknown: checked above)
    for k, shape in expected.items():
        have = shape_of(sd, k)
        if have != shape and k in VOCAB_KEYS and have[1:] == shape[1:] and \
                source_vocab == mc.vocab_size and min(have[0], shape[0]) >= mc.vocab_size:
            out[k] = fit_vocab_rows(sd[k], shape[0])
            have = shape
        if have != shape:
            raise CheckpointError(f"{where}: '{k}' has shape {have} in the source, this run's model "
                                  f"needs {shape}")
    tied = isinstance(out, LazyStateDict) and out.is_alias("head.weight", "embedding.weight")
    if mc.tie_embeddings and not tied and not torch.equal(out["head.weight"], out["embedding.weight"]):
        raise CheckpointError(f"{where}: 'head.weight' differs from 'embedding.weight' in the source (an untied "
                              f"head), but model.tie_embeddings=true here; set model.tie_embeddings=false")
    return out


def init_state_dict(path, mc: ModelConfig, verify: bool = True) -> Tuple[Dict[str, torch.Tensor], str]:
    """(state dict for LoopedLM(mc), a note naming what was read) from `path` (see the module doc); verify: a
    checkpoint's checksums are checked first (megaloop.checkpoint.integrity)."""
    sd, src_cfg, source = init_state_dict_source(path, verify)
    sm = src_cfg.model
    sd = check_state_dict(sd, mc, f"init.from {source}", sm.vocab_size, sm.tie_embeddings)
    return sd, f"initialised the weights from {source} (weights only: fresh optimizer, step 0)"


def init_state_dict_source(path, verify: bool = True):
    """(the source's full state dict, its run config, the file or tag folder read), unchecked (verify: the
    checksums of a checkpoint tag are, as in megaloop.checkpoint.load)."""
    source = Path(path)
    if not source.exists():
        raise _refuse(path, "does not exist (name a run folder, a checkpoint root, a step_N folder or an "
                            "imported model folder)")
    try:
        source = resolve(source) if is_deepspeed_checkpoint(source) else plain_file(source)
        sd, src_cfg = load(source, verify=verify)
    except CheckpointError as e:
        raise _refuse(path, str(e)) from e
    return sd, src_cfg, source
