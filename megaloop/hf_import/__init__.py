"""Import a Hugging Face model folder as a megaloop run folder (tools/import_hf.py).

    import_hf(model_dir, output_dir, overrides=[...], retrofit=None, block_from=None) -> Path

Source formats, one module each (what is read, what it maps to, what is refused: see each docstring):

    megaloop_format  megaloop's own export (config.json model_type "megaloop")
    ouro             OuroForCausalLM (model_type "ouro"): shared looped layers, sandwich norms, exit gate
    llama            LlamaForCausalLM (model_type "llama"): plain (R = 1), or retrofitted into
                     prelude / looped block / coda (`retrofit=(P, B, C)`)
    common           reading the folder, checking the mapping key by key, writing the run folder

The run folder written (staged in a temporary folder beside it, renamed at the end: a refusal or a
failure leaves nothing):

    config.yaml    the resolved run config (the source's model, the user's `section.key=value` overrides)
    model.safetensors  the weights (one LoopedLM state dict) + the config (megaloop.checkpoint.plain's format)
    import.json    source folder, format, notes, the megaloop parameters left at megaloop's own init
    tokenizer.model  (a sentencepiece tokenizer of a megaloop export, referenced by config.yaml)
    tokenizer.json, tokenizer_config.json  (a Hugging Face tokenizer: Ouro's, Qwen's, Llama 3's, a megaloop
                   export's; config.yaml: data.tokenizer_type hf, data.tokenizer_model RUN_DIR/tokenizer.json)

The tokenizer comes along, so `tools/preprocess_data.py --tokenizer-type hf --tokenizer-model RUN_DIR`,
`pretrain_looped.py --config RUN_DIR/config.yaml init.from=RUN_DIR` and the export use it without its
path typed again. A Hugging Face tokenizer is loaded at import: one with more ids than the model's
vocabulary, or whose end-of-document token cannot be told (pass data.tokenizer_eod=TOKEN), is refused.

A new run starts from it with `init.from: RUN_DIR` (weights only, any TP x PP x ZeRO layout, fresh
optimizer, step 0); megaloop.checkpoint.load_model(RUN_DIR), tools/export_hf.py, tools/eval_loops.py
read it directly. This package imports megaloop.checkpoint / megaloop.model; they never import it.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional, Tuple

from megaloop.hf_import.common import HFImportError, Tensors, map_weights, read_config_json, write_run

FORMATS = ("megaloop", "ouro", "llama")


def detect(hf: dict, folder: Path) -> str:
    mt = hf.get("model_type")
    archs = hf.get("architectures") or []
    if mt in FORMATS:
        return mt
    if "OuroForCausalLM" in archs:
        return "ouro"
    raise HFImportError(f"{folder / 'config.json'}: model_type {mt!r} (architectures {archs}) is not supported; "
                        f"importable: megaloop (megaloop's own export), ouro (OuroForCausalLM), llama "
                        f"(LlamaForCausalLM)")


def read_source(model_dir, overrides: Optional[List[str]] = None, retrofit: Optional[Tuple[int, int, int]] = None,
                block_from: Optional[int] = None):
    """(Mapping, megaloop Config, full LoopedLM state dict, keys left at megaloop's init) of a folder."""
    from megaloop.config import ConfigError, config_from_dict
    from megaloop.hf_import import llama, megaloop_format, ouro

    folder = Path(model_dir)
    hf = read_config_json(folder)
    fmt = detect(hf, folder)
    if retrofit is not None and fmt != "llama":
        raise HFImportError(f"--retrofit applies to Llama models; {folder} is a {fmt} model")
    tensors = Tensors(folder)
    if fmt == "megaloop":
        m = megaloop_format.read(folder, hf, tensors)
    elif fmt == "ouro":
        m = ouro.read(folder, hf, tensors)
    else:
        m = llama.read(folder, hf, tensors, retrofit, block_from)
    if "data" not in m.config:
        _tokenizer(folder, m)
    tree = {k: dict(v) for k, v in m.config.items()}
    seq = tree.setdefault("data", {}).get("seq_len", 128)
    tree["data"]["seq_len"] = min(seq, int(tree["model"].get("max_seq_len", seq)))
    try:
        cfg = config_from_dict(tree, list(overrides or []))
    except ConfigError as e:
        raise ConfigError(f"importing {folder}: {e}") from e
    _check_hf_tokenizer(folder, m, cfg)
    sd, kept = map_weights(m, tensors, cfg)
    return m, cfg, sd, kept


def _tokenizer(folder: Path, m) -> None:
    """The folder's tokenizer is copied and used: a sentencepiece tokenizer.model (Llama 2's, a megaloop
    llama-format export's), else a Hugging Face tokenizer.json (Qwen / Ouro, Llama 3) with its
    tokenizer_config.json (which names the eos token). Without either the run keeps the byte tokenizer
    setting, with a note."""
    if (folder / "tokenizer.model").is_file():
        m.files["tokenizer.model"] = folder / "tokenizer.model"
        m.config["data"] = {"tokenizer_type": "sentencepiece", "tokenizer_model": "tokenizer.model"}
    elif (folder / "tokenizer.json").is_file():
        add_hf_tokenizer(folder, m)
    else:
        m.notes.append("tokenizer not imported (the folder has no tokenizer.json or tokenizer.model): set "
                       "data.tokenizer_type / data.tokenizer_model to the tokenizer your data was preprocessed with")


def add_hf_tokenizer(folder: Path, m) -> None:
    """Copy the folder's tokenizer.json (+ tokenizer_config.json) and make it the run's tokenizer."""
    m.files["tokenizer.json"] = folder / "tokenizer.json"
    if (folder / "tokenizer_config.json").is_file():
        m.files["tokenizer_config.json"] = folder / "tokenizer_config.json"
    m.config["data"] = {"tokenizer_type": "hf", "tokenizer_model": "tokenizer.json"}


def _check_hf_tokenizer(folder: Path, m, cfg) -> None:
    """A Hugging Face tokenizer that comes along must load, name its end of document and fit the model."""
    from megaloop.config import ConfigError
    from megaloop.data.tokenizer import TokenizerError
    from megaloop.data.tokenizer_hf import HFTokenizer

    if "tokenizer.json" not in m.files or cfg.data.tokenizer_model != "tokenizer.json":
        return  # none, or the user's overrides chose another tokenizer
    try:
        tok = HFTokenizer(m.files["tokenizer.json"], eod_token=cfg.data.tokenizer_eod)
    except TokenizerError as e:
        why = str(e).replace("--tokenizer-eod TOKEN (data.tokenizer_eod in a config)",
                             "the override data.tokenizer_eod=TOKEN")
        raise HFImportError(f"importing {folder}: {why}") from None
    if tok.vocab_size > cfg.model.vocab_size:
        raise ConfigError(f"importing {folder}: its tokenizer.json has {tok.vocab_size} ids but the model's vocabulary "
                          f"(model.vocab_size) has {cfg.model.vocab_size}: the folder's tokenizer is not the model's")


def import_hf(model_dir, output_dir, overrides: Optional[List[str]] = None,
              retrofit: Optional[Tuple[int, int, int]] = None, block_from: Optional[int] = None) -> Path:
    """Write a megaloop run folder for a Hugging Face model folder (see the module doc); returns its path.
    Raises HFImportError / ConfigError (one line, nothing written) for what cannot be imported."""
    import shutil

    from megaloop.checkpoint.plain import save_plain
    from megaloop.config import save_config
    from megaloop.hf_import.common import check_output

    out = Path(output_dir).resolve()
    check_output(out)
    m, cfg, sd, kept = read_source(model_dir, overrides, retrofit, block_from)
    for name in m.files:
        if cfg.data.tokenizer_model == name:
            cfg.data.tokenizer_model = str(out / name)

    def write(tmp: Path):
        for name, src in m.files.items():
            shutil.copyfile(src, tmp / name)
        save_config(cfg, tmp / "config.yaml")
        save_plain(sd, cfg, tmp / "model.safetensors")
        (tmp / "import.json").write_text(json.dumps({
            "source": str(Path(model_dir).resolve()), "format": m.fmt, "notes": m.notes,
            "overrides": list(overrides or []), "at_megaloop_init": kept,
            "start_a_run": f"pretrain_looped.py --config {out / 'config.yaml'} init.from={out} "
                           f"train.output_dir=NEW_RUN_DIR data.data_path=[...]"}, indent=2) + "\n")

    return write_run(out, write)


__all__ = ["FORMATS", "HFImportError", "detect", "import_hf", "read_source"]
