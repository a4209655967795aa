"""What the evaluation tools read: a model (checkpoint or exported folder) with its tokenizer, and token
windows of an indexed dataset's validation documents or of a raw text file (tools/eval_loops.py,
tools/eval_harness.py, tools/generate.py, tools/export_hf.py).

An indexed dataset made with another tokenizer than the model's is refused in one line: by its
{prefix}.tokenizer.json (written by tools/preprocess_data.py), and by token ids outside the model's
vocabulary (datasets without that file, e.g. from Megatron-LM). A checkpoint's relative tokenizer path
(data.tokenizer_model) is looked up from the current folder, then under the run folder and its parents;
`tokenizer_model` names the file directly.
"""
from __future__ import annotations

import sys
from pathlib import Path

from megaloop.errors import UsageError


def load_model_for_cli(model, step=None, tokenizer_model=None, verify=True):
    """megaloop.generation.load_lm for the tools: an exported folder as it is; for a checkpoint, its
    tokenizer model file found with megaloop.data.tokenizer.resolve_tokenizer_model (--tokenizer-model, or
    the run's relative path from here, the run folder or its parents) before the weights are read. verify:
    check the checkpoint's files against the checksums recorded when it was saved."""
    from megaloop.generation import _is_hf_folder, load_lm, wrap_megaloop

    path = Path(model)
    if path.is_dir() and _is_hf_folder(path):
        if tokenizer_model:
            raise UsageError(f"--tokenizer-model: {model} is an exported folder, which carries its own tokenizer; "
                             f"drop --tokenizer-model")
        return load_lm(model, step)
    from megaloop.checkpoint import is_deepspeed_checkpoint, load_config, load_model
    from megaloop.data.tokenizer import build_tokenizer

    # A training checkpoint's config is one small file: find the tokenizer before reading the weights. A
    # plain file holds both, so it is read once.
    lm_model, cfg = ((None, load_config(path, step)) if is_deepspeed_checkpoint(path)
                     else load_model(path, step, verify=verify))
    tok_path = checkpoint_tokenizer_model(model, cfg.data, tokenizer_model)
    tokenizer = build_tokenizer(cfg.data.tokenizer_type, tok_path, eod_token=cfg.data.tokenizer_eod)
    if lm_model is None:
        lm_model, _ = load_model(path, step, verify=verify)
    return wrap_megaloop(lm_model, tokenizer)


def checkpoint_tokenizer_model(model, data_cfg, tokenizer_model=None):
    """The tokenizer model file of a checkpoint's run (None for the byte tokenizer), resolved for this cwd."""
    from megaloop.data.tokenizer import normalize_tokenizer_type, resolve_tokenizer_model

    kind = normalize_tokenizer_type(data_cfg.tokenizer_type)
    if kind == "byte":
        if tokenizer_model:
            raise UsageError(f"--tokenizer-model: {model} was trained with the byte tokenizer, which has no model "
                             f"file; drop --tokenizer-model")
        return None
    return resolve_tokenizer_model(data_cfg.tokenizer_model, [model], tokenizer_model)


def model_tokenizer_reference(model, step=None, tokenizer_model=None):
    """The tokenizer a model was trained with, as megaloop.data.dataset_tokenizer takes it: for an exported
    folder its tokenizer files ({"type", "model"}), for a checkpoint the run's data.tokenizer_type /
    tokenizer_model (resolved as load_model_for_cli does). None when the model does not say."""
    import json

    from megaloop.generation import _is_hf_folder

    path = Path(model)
    if path.is_dir() and _is_hf_folder(path):
        tok_cfg = path / "tokenizer_config.json"
        if (path / "tokenizer.json").is_file():
            return {"type": "hf", "model": str(path / "tokenizer.json")}
        if not tok_cfg.is_file():
            return None
        cls = json.loads(tok_cfg.read_text()).get("tokenizer_class", "")
        if cls == "MegaloopByteTokenizer":
            return {"type": "byte", "model": None}
        if cls == "MegaloopSentencePieceTokenizer":
            return {"type": "sentencepiece", "model": str(path / "tokenizer.model")}
        return None
    from megaloop.checkpoint import load_config

    data_cfg = load_config(path, step).data
    return {"type": data_cfg.tokenizer_type, "model": checkpoint_tokenizer_model(model, data_cfg, tokenizer_model),
            "eod": data_cfg.tokenizer_eod}


def run_config(model, step=None):
    """The run config of a checkpoint (megaloop.checkpoint.load_config); None for an exported folder."""
    from megaloop.generation import _is_hf_folder

    path = Path(model)
    if path.is_dir() and _is_hf_folder(path):
        return None
    from megaloop.checkpoint import load_config

    return load_config(path, step)


MEGATRON_SPLIT = "969,30,1"


def eval_split(model, step, data, split=None):
    """The split whose validation documents are evaluated: `split` when given; else the run's data.split
    when `data` is one of the datasets the run (a checkpoint) trained on, so that its validation documents
    are the ones training held out; else Megatron's default 969,30,1."""
    if split is not None or data is None:
        return split or MEGATRON_SPLIT
    cfg = run_config(model, step)
    if cfg is None or not is_run_dataset(data, cfg.data):
        return MEGATRON_SPLIT
    print(f"note: validation documents of the run's data.split {cfg.data.split!r} ({data} is its data_path; "
          f"--split chooses another)", file=sys.stderr)
    return cfg.data.split


def is_run_dataset(data, data_cfg) -> bool:
    """Whether the dataset prefix `data` is one of data_cfg.data_path's (the same .idx file)."""
    import os

    from megaloop.data import parse_data_paths
    from megaloop.data.indexed_dataset import DataError

    try:
        paths = parse_data_paths(data_cfg.data_path)[0] if data_cfg.data_path else []
    except DataError:
        return False
    for path in paths:
        try:
            if os.path.samefile(f"{path}.idx", f"{data}.idx"):
                return True
        except OSError:  # the run's path does not resolve from here
            continue
    return False


def load_eval_tokens(lm, data=None, text=None, split=MEGATRON_SPLIT, max_tokens=1 << 20, tokenizer_ref=None):
    """The one place that reads evaluation data: a 1-D int64 numpy array of token ids. An indexed dataset
    must fit the model: a tokenizer record ({data}.tokenizer.json) naming another tokenizer than
    `tokenizer_ref`, or a token id outside the model's vocabulary, raises DatasetTokenizerError."""
    import numpy as np

    if (data is None) == (text is None):
        raise UsageError("give exactly one of --data (indexed dataset prefix) or --text (raw text file)")
    if text is not None:
        try:
            raw = Path(text).read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise UsageError(f"--text {text}: not UTF-8 text (byte {e.start}); give a UTF-8 file") from None
        ids = lm.encode(raw)
        return np.asarray(ids[:max_tokens], dtype=np.int64)
    from megaloop.data.dataset_tokenizer import check_dataset_tokenizer, check_token_ids
    from megaloop.data.gpt_dataset import parse_split
    from megaloop.data.indexed_dataset import IndexedDataset

    if tokenizer_ref is not None:
        check_dataset_tokenizer(data, tokenizer_ref)
    ds = IndexedDataset(data)
    start, end = parse_split(split, ds.num_documents)[1]  # the validation range
    if start == end:
        print(f"note: split {split!r} leaves no validation documents in {data}; using all documents",
              file=sys.stderr)
        start, end = 0, ds.num_documents
    chunks, total = [], 0
    for d in range(start, end):
        doc = np.asarray(ds.get_document(d), dtype=np.int64)
        chunks.append(doc)
        total += doc.size
        if total >= max_tokens:
            break
    tokens = np.concatenate(chunks)[:max_tokens] if chunks else np.zeros(0, dtype=np.int64)
    if lm.vocab_size:
        check_token_ids(tokens, lm.vocab_size, f"dataset {data}")
    return tokens


def windows(tokens, seq_len, max_windows, batch_size, source="the evaluation data"):
    import torch

    n = min(max_windows, (len(tokens) - 1) // seq_len)
    if n < 1:
        raise UsageError(f"{source} holds only {len(tokens)} tokens, not enough for one window of --seq-len "
                         f"{seq_len} + 1: lower --seq-len, or give more text / validation documents (--split)")
    t = torch.as_tensor(tokens[: n * seq_len + 1])
    x = torch.stack([t[i * seq_len: (i + 1) * seq_len] for i in range(n)])
    y = torch.stack([t[i * seq_len + 1: (i + 1) * seq_len + 1] for i in range(n)])
    return list(zip(x.split(batch_size), y.split(batch_size)))


