"""Which tokenizer made a dataset, and refusing a dataset that meets a model with another tokenizer.

tools/preprocess_data.py writes `{prefix}.tokenizer.json` next to `{prefix}.bin` / `{prefix}.idx`:

    {"format": "megaloop-dataset-tokenizer/1", "type": "sentencepiece", "vocab_size": 32000,
     "model_sha256": "9f2c...", "model": "/abs/path/spm.model", "eod_id": 2}

`type` is byte | sentencepiece | hf | tiktoken; `model` is the file that defines the tokenizer (the
sentencepiece .model, the tokenizer.json, also when given as its folder, the .tiktoken file), null with
its hash for the byte tokenizer. Megatron-LM reads only .bin/.idx and ignores it.
`check_dataset_tokenizer(prefix, reference)` compares it with the tokenizer a model was trained with
(type, vocabulary size, sha256 of the model file, end-of-document id) and raises DatasetTokenizerError, a
ConfigError with a one-line message, on a mismatch. A dataset without the file (made by Megatron-LM or an older
megaloop) is accepted; the token-id range checks (`check_token_ids`) still apply to it.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Dict, Optional

import numpy as np

from megaloop.config import ConfigError

SIDECAR_SUFFIX = ".tokenizer.json"
SIDECAR_FORMAT = "megaloop-dataset-tokenizer/1"


class DatasetTokenizerError(ConfigError):
    """A dataset made with another tokenizer than the model's; the message names the dataset."""


def sidecar_path(prefix) -> str:
    return f"{os.fspath(prefix)}{SIDECAR_SUFFIX}"


def file_sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _normalized_type(kind: str) -> str:
    from megaloop.data.tokenizer import normalize_tokenizer_type

    return normalize_tokenizer_type(kind) or str(kind)


def _model_file(tokenizer) -> Optional[str]:
    """The file whose bytes define the tokenizer: the sentencepiece .model, the tokenizer.json (also when
    the tokenizer was given as its folder), the .tiktoken file; None for the byte tokenizer."""
    return getattr(tokenizer, "json_path", None) or getattr(tokenizer, "model_path", None) \
        or getattr(tokenizer, "path", None)


def tokenizer_record(reference) -> Optional[Dict[str, Any]]:
    """{"type", "vocab_size", "model_sha256", "model", "eod_id"} of a tokenizer reference, with what is
    known: a megaloop Tokenizer, a Config / DataConfig (data.tokenizer_type / tokenizer_model /
    tokenizer_eod), a reference dict {"type", "model", "eod"} (what checkpoints store,
    megaloop.training.data.tokenizer_reference) or a record read from a sidecar. None: nothing known."""
    from megaloop.data.tokenizer import ByteTokenizer, Tokenizer, build_tokenizer
    from megaloop.data.tokenizer_hf import HFTokenizer, TiktokenTokenizer

    if reference is None:
        return None
    if hasattr(reference, "data") and hasattr(reference.data, "tokenizer_type"):  # a Config
        reference = reference.data
    if hasattr(reference, "tokenizer_type"):  # a DataConfig
        reference = {"type": reference.tokenizer_type, "model": reference.tokenizer_model,
                     "eod": getattr(reference, "tokenizer_eod", None)}
    if isinstance(reference, Tokenizer):
        kind = "byte" if isinstance(reference, ByteTokenizer) else "hf" if isinstance(reference, HFTokenizer) \
            else "tiktoken" if isinstance(reference, TiktokenTokenizer) else "sentencepiece"
        path = _model_file(reference)
        return {"type": kind, "vocab_size": reference.vocab_size, "model_sha256": file_sha256(path) if path else None,
                "model": os.path.abspath(path) if path else None, "eod_id": int(reference.eod_id)}
    if not isinstance(reference, dict) or not reference.get("type"):
        raise TypeError(f"not a tokenizer reference: {reference!r}")
    if "vocab_size" in reference:  # already a record
        return dict(reference, type=_normalized_type(reference["type"]))
    kind, model = _normalized_type(reference["type"]), reference.get("model")
    record = {"type": kind, "vocab_size": None, "model_sha256": None, "model": model}
    try:
        record = tokenizer_record(build_tokenizer(kind, model, eod_token=reference.get("eod")))
    except (ValueError, OSError):
        if model and os.path.isfile(model):  # a model file that does not load: still compare its bytes
            record["model_sha256"] = file_sha256(model)
    return record


def write_sidecar(prefix, tokenizer) -> str:
    """Write {prefix}.tokenizer.json for `tokenizer` atomically; returns its path."""
    record = dict(tokenizer_record(tokenizer), format=SIDECAR_FORMAT)
    path = sidecar_path(prefix)
    from megaloop.tempfiles import remove_stale, temp_suffix
    remove_stale(os.path.dirname(os.path.abspath(path)), os.path.basename(path))  # a killed run's leftover
    tmp = f"{path}{temp_suffix()}"
    try:
        with open(tmp, "w") as f:
            json.dump(record, f, indent=1)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def read_sidecar(prefix) -> Optional[Dict[str, Any]]:
    """The tokenizer record of a dataset, or None when it has none (Megatron-LM, older megaloop)."""
    path = sidecar_path(prefix)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            record = json.load(f)
        if not isinstance(record, dict) or not record.get("type"):
            raise ValueError("no tokenizer type in it")
    except (OSError, ValueError) as e:
        raise DatasetTokenizerError(f"dataset {prefix}: unreadable tokenizer record {path} ({e}); delete it to "
                                    f"use the dataset without a tokenizer check") from None
    return dict(record, type=_normalized_type(record["type"]))


def describe(record: Dict[str, Any]) -> str:
    parts = []
    if record.get("vocab_size") is not None:
        parts.append(f"vocab {record['vocab_size']}")
    if record.get("model_sha256"):
        parts.append(f"model sha256 {record['model_sha256'][:12]}")
    if record.get("model"):
        parts.append(f"from {record['model']}")
    return f"{record['type']} ({', '.join(parts)})" if parts else record["type"]


def tokenizer_mismatch(data: Dict[str, Any], model: Dict[str, Any]) -> Optional[str]:
    """Why two tokenizer records differ, or None when they may be the same tokenizer."""
    if data["type"] != model["type"]:
        return "another tokenizer type"
    if data.get("vocab_size") is not None and model.get("vocab_size") is not None \
            and int(data["vocab_size"]) != int(model["vocab_size"]):
        return "another vocabulary size"
    if data.get("model_sha256") and model.get("model_sha256") and data["model_sha256"] != model["model_sha256"]:
        return "another tokenizer model file"
    if data.get("eod_id") is not None and model.get("eod_id") is not None \
            and int(data["eod_id"]) != int(model["eod_id"]):
        return "another end-of-document id"
    return None


def check_dataset_tokenizer(prefix, tokenizer_ref_or_cfg) -> None:
    """Refuse a dataset whose recorded tokenizer differs from the model's (DatasetTokenizerError, one
    line). `tokenizer_ref_or_cfg`: see tokenizer_record. A dataset without a record, or a reference that
    says nothing, passes."""
    data = read_sidecar(prefix)
    model = tokenizer_record(tokenizer_ref_or_cfg) if data is not None else None
    if data is None or model is None:
        return
    why = tokenizer_mismatch(data, model)
    if why:
        raise DatasetTokenizerError(
            f"dataset {prefix} was tokenized with {describe(data)} ({sidecar_path(prefix)}), but the model uses "
            f"{describe(model)}: {why}. Re-run tools/preprocess_data.py with the model's tokenizer, or use the "
            f"tokenizer the data was made with")


def check_token_ids(tokens, vocab_size: int, what: str) -> None:
    """Refuse token ids outside [0, vocab_size) (a dataset preprocessed with another tokenizer)."""
    tokens = np.asarray(tokens)
    if tokens.size == 0:
        return
    high, low = int(tokens.max()), int(tokens.min())
    if high >= vocab_size or low < 0:
        held = f"token ids up to {high}" if high >= vocab_size else f"a negative token id {low}"
        raise DatasetTokenizerError(f"{what} holds {held}, but the model's vocabulary has {vocab_size} ids "
                                    f"(0..{vocab_size - 1}): was it preprocessed with another tokenizer?")
