"""megaloop's own Hugging Face export (megaloop/export: config.json with model_type "megaloop").

The export stores the whole ModelConfig under `megaloop_model_config` and the weights under
LoopedLM's own names (a tied head once, as embedding.weight), so the import is the identity on
names; `num_loops` (the default R a user may have edited in config.json) becomes model.loops. The
tokenizer reference comes back too: the byte tokenizer, or the sentencepiece tokenizer.model or the
tokenizer.json the export copied (copied again into the run folder).
"""
from __future__ import annotations

import json
from pathlib import Path

from megaloop.hf_import.common import HFImportError, Mapping, Tensors


def read(folder: Path, hf: dict, tensors: Tensors) -> Mapping:
    from megaloop.checkpoint.reader import expected_shapes
    from megaloop.config import ConfigError, config_from_dict

    mcd = hf.get("megaloop_model_config")
    if not isinstance(mcd, dict):
        raise HFImportError(f"{folder / 'config.json'}: model_type 'megaloop' without 'megaloop_model_config' "
                            f"(written by every megaloop export); re-export the model with tools/export_hf.py")
    mcd = dict(mcd)
    if hf.get("num_loops") is not None:
        mcd["loops"] = int(hf["num_loops"])
    try:
        seq = min(128, int(mcd.get("max_seq_len") or 128))
        loops, table = int(mcd.get("loops") or 1), int(mcd.get("max_loops") or 64)
        loop = {"sampling": "fixed", "mean": loops, "max": max(loops, min(32, table))}
        mc = config_from_dict({"model": mcd, "data": {"seq_len": seq}, "loop": loop}).model
    except ConfigError as e:
        raise HFImportError(f"{folder / 'config.json'}: megaloop_model_config is not a valid model config: {e}") from e
    weights = {}
    for k in expected_shapes(mc):
        if k == "head.weight" and mc.tie_embeddings:
            if k in tensors:
                tensors.ignore(k)
            continue
        weights[k] = k
    config = {"model": mcd, "loop": loop}
    m = Mapping("megaloop", config, weights)
    tok = _tokenizer(folder)
    if tok == "hf":
        from megaloop.hf_import import add_hf_tokenizer

        add_hf_tokenizer(folder, m)
    elif tok == "sentencepiece":
        m.files["tokenizer.model"] = folder / "tokenizer.model"
        config["data"] = {"tokenizer_type": "sentencepiece", "tokenizer_model": "tokenizer.model"}
    elif tok == "byte":
        config["data"] = {"tokenizer_type": "byte"}
    return m


def _tokenizer(folder: Path):
    try:
        cls = json.loads((folder / "tokenizer_config.json").read_text()).get("tokenizer_class")
    except (OSError, ValueError, AttributeError):
        return None
    if cls == "MegaloopSentencePieceTokenizer" and (folder / "tokenizer.model").is_file():
        return "sentencepiece"
    if (folder / "tokenizer.json").is_file():
        return "hf"
    return "byte" if cls == "MegaloopByteTokenizer" else None
