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
    model.pt       the weights as one LoopedLM state dict + the config (megaloop.checkpoint.plain's format)
    import.json    source folder, format, notes, the megaloop parameters left at megaloop's own init
    tokenizer.model  (a sentencepiece tokenizer of a megaloop export, referenced by config.yaml)

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
    sd, kept = map_weights(m, tensors, cfg)
    return m, cfg, sd, kept


def _tokenizer(folder: Path, m) -> None:
    """A sentencepiece tokenizer.model in the folder (Llama 2's, a megaloop llama-format export's) is
    copied and used; any other tokenizer (tokenizer.json: BPE of Qwen / Ouro, Llama 3) is not one megaloop
    reads: the run keeps the byte tokenizer setting, with a note."""
    if (folder / "tokenizer.model").is_file():
        m.files["tokenizer.model"] = folder / "tokenizer.model"
        m.config["data"] = {"tokenizer_type": "sentencepiece", "tokenizer_model": "tokenizer.model"}
    else:
        m.notes.append("tokenizer not imported (megaloop reads byte and sentencepiece tokenizers only): set "
                       "data.tokenizer_type / data.tokenizer_model to the tokenizer your data was preprocessed with")


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
        save_plain(sd, cfg, tmp / "model.pt")
        (tmp / "import.json").write_text(json.dumps({
            "source": str(Path(model_dir).resolve()), "format": m.fmt, "notes": m.notes,
            "overrides": list(overrides or []), "at_megaloop_init": kept,
            "start_a_run": f"pretrain_looped.py --config {out / 'config.yaml'} init.from={out} "
                           f"train.output_dir=NEW_RUN_DIR data.data_path=[...]"}, indent=2) + "\n")

    return write_run(out, write)


__all__ = ["FORMATS", "HFImportError", "detect", "import_hf", "read_source"]
