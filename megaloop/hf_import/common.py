"""What every source format shares: reading a Hugging Face folder (config.json + safetensors / .bin
weights), mapping its tensors onto LoopedLM names with every key, shape and leftover checked, and
writing the megaloop run folder (staged in a temporary folder, renamed into place at the end).

A format module turns (config.json, the tensors) into a `Mapping`: the run config (a dict of
sections, before the user's overrides) and {megaloop key: source key or tensor}. `map_weights` then
checks the mapping against LoopedLM(mc) for the final config: a source tensor the mapping needs but
the folder lacks ("missing"), a tensor of the folder that no mapping consumed ("unknown"), a shape
that differs (the vocabulary padding rows of embedding / head excepted: they are zero-filled) - each
an HFImportError naming the key, before anything is written. Parameters megaloop has and the source
does not (a gate added by an override, the unused outer norm of an Ouro config) keep megaloop's own
initialisation (seeded with train.seed) and are listed in import.json.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Dict, List, Tuple, Union

import torch

from megaloop.checkpoint.init_weights import fit_vocab_rows
from megaloop.errors import MegaloopError

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
RUN_FILES = ("config.yaml", "model.safetensors", "import.json")


class HFImportError(MegaloopError, ValueError):
    """A folder that cannot be imported as asked; the one-line message names the file, key or field."""


@dataclasses.dataclass
class Mapping:
    """A source folder read by a format module."""
    fmt: str                                   # "megaloop" | "ouro" | "llama"
    config: dict                               # run config sections (model, loop, data, ...), before overrides
    weights: Dict[str, Union[str, torch.Tensor]]  # megaloop key -> source key (or a computed tensor)
    notes: List[str] = dataclasses.field(default_factory=list)
    files: Dict[str, Path] = dataclasses.field(default_factory=dict)  # extra files to copy: name -> source


# ------------------------------------------------------------------------------------------------
# Reading


def read_config_json(folder: Path) -> dict:
    path = folder / "config.json"
    if not folder.is_dir():
        raise HFImportError(f"--model {folder}: no such folder")
    if not path.is_file():
        raise HFImportError(f"{path}: no such file; --model must be a Hugging Face model folder (config.json + "
                            f"model.safetensors)")
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise HFImportError(f"{path}: not readable JSON ({' '.join(str(e).split())})") from e
    if not isinstance(cfg, dict):
        raise HFImportError(f"{path}: the top level is not a JSON object")
    return cfg


def field(cfg: dict, name: str, where: Path, default=None, required: bool = True):
    if name in cfg and cfg[name] is not None:
        return cfg[name]
    if required and default is None:
        raise HFImportError(f"{where / 'config.json'}: no '{name}'")
    return default


class Tensors:
    """The tensors of a folder, by name, remembering which ones a mapping consumed."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.where: Dict[str, str] = {}
        self._data: Dict[str, torch.Tensor] = {}
        for f in self._files():
            for k, v in self._read(f).items():
                if k in self._data:
                    raise HFImportError(f"{f}: tensor '{k}' also appears in {self.where[k]}")
                self._data[k] = v
                self.where[k] = f.name
        self.used: set = set()

    def _files(self) -> List[Path]:
        d = self.folder
        for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
            if (d / index).is_file():
                try:
                    names = sorted(set(json.loads((d / index).read_text())["weight_map"].values()))
                except (OSError, ValueError, KeyError, AttributeError) as e:
                    raise HFImportError(f"{d / index}: no readable weight_map ({type(e).__name__})") from e
                missing = [n for n in names if not (d / n).is_file()]
                if missing:
                    raise HFImportError(f"{d / missing[0]}: no such file (listed in {index})")
                return [d / n for n in names]
        for name in ("model.safetensors", "pytorch_model.bin"):
            if (d / name).is_file():
                return [d / name]
        raise HFImportError(f"{d}: no weights (looked for {', '.join(WEIGHT_FILES)})")

    @staticmethod
    def _read(f: Path) -> Dict[str, torch.Tensor]:
        try:
            if f.suffix == ".safetensors":
                from safetensors.torch import load_file
                return load_file(str(f))
            from megaloop.checkpoint.safe_load import load
            obj = load(f)  # weights_only (a pytorch_model.bin is a pickle)
        except Exception as e:  # noqa: BLE001 - a truncated / foreign file: name it
            raise HFImportError(f"{f}: cannot read the weights ({type(e).__name__}: "
                                f"{' '.join(str(e).split())[:200]})") from e
        if not isinstance(obj, dict) or not all(torch.is_tensor(v) for v in obj.values()):
            raise HFImportError(f"{f}: not a dict of tensors")
        return obj

    def __contains__(self, key: str) -> bool:
        return key in self._data

    def keys(self):
        return self._data.keys()

    def peek(self, key: str) -> torch.Tensor:
        return self._data[key]

    def take(self, key: str, for_key: str) -> torch.Tensor:
        if key not in self._data:
            raise HFImportError(f"{self.folder}: missing tensor '{key}' (megaloop's '{for_key}' is read from it)")
        self.used.add(key)
        return self._data[key]

    def ignore(self, key: str) -> None:
        """Consume a tensor on purpose (a tied head stored twice, a buffer)."""
        self.used.add(key)

    def leftover(self) -> List[str]:
        return sorted(k for k in self._data if k not in self.used)


# ------------------------------------------------------------------------------------------------
# Mapping onto LoopedLM


# No trained weight comes near this; a flipped exponent bit in a file (3.4e38, 1e37...) does.
MAX_ABS_WEIGHT = 1e20


def check_finite(t: torch.Tensor, folder, name: str, mk: str) -> None:
    """Refuse a weight with a non-finite value, or one beyond MAX_ABS_WEIGHT (a damaged file)."""
    if not t.numel():
        return
    amax = float(t.abs().max())
    if not (amax <= MAX_ABS_WEIGHT):  # (also true for NaN)
        bad = int((~torch.isfinite(t)).sum())
        what = f"{bad} non-finite value(s)" if bad else f"values up to {amax:.3g} (beyond {MAX_ABS_WEIGHT:.0e})"
        raise HFImportError(f"{folder}: {name} (megaloop's '{mk}') has {what}: the weights file is damaged or the "
                            f"model diverged; nothing was imported")


def map_weights(m: Mapping, tensors: Tensors, cfg) -> Tuple[Dict[str, torch.Tensor], List[str]]:
    """The full LoopedLM state dict for `cfg` (a megaloop Config) from the mapping, checked; and the
    megaloop keys left at megaloop's own init."""
    from megaloop.model import build_model

    mc = cfg.model
    torch.manual_seed(cfg.train.seed)
    fresh = build_model(cfg).state_dict()
    shapes = {k: tuple(v.shape) for k, v in fresh.items()}
    out = {}
    for mk, src in m.weights.items():
        t = src if torch.is_tensor(src) else tensors.take(src, mk)
        name = "a tensor computed from the source" if torch.is_tensor(src) else f"'{src}'"
        if mk not in shapes:
            raise HFImportError(f"{tensors.folder}: {name} maps to megaloop's '{mk}', which this config has no "
                                f"place for (an override removed it?)")
        want = shapes[mk]
        if mk in ("embedding.weight", "head.weight") and t.dim() == 2 and t.shape[1] == want[1] and \
                min(t.shape[0], want[0]) >= mc.vocab_size:
            t = fit_vocab_rows(t, want[0])  # only padding rows differ (they never see a token)
        if tuple(t.shape) != want:
            raise HFImportError(f"{tensors.folder}: {name} has shape {tuple(t.shape)}; megaloop's '{mk}' needs "
                                f"{want} (config.json and the weights disagree, or an override changed a size)")
        out[mk] = t.detach().to(torch.float32).clone()
        check_finite(out[mk], tensors.folder, name if torch.is_tensor(src) else f"{name} in {tensors.where[src]}", mk)
    unknown = tensors.leftover()
    if unknown:
        more = f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""
        raise HFImportError(f"{tensors.folder}: unknown tensor '{unknown[0]}'{more} in {tensors.where[unknown[0]]}: "
                            f"no place for it in the {m.fmt} mapping (a variant this importer does not support)")
    if mc.tie_embeddings:
        if "head.weight" in out and not torch.equal(out["head.weight"], out["embedding.weight"]):
            raise HFImportError(f"{tensors.folder}: the output head differs from the input embedding, but the "
                                f"config ties them (model.tie_embeddings=true)")
        out["head.weight"] = out["embedding.weight"]
    kept = sorted(k for k in fresh if k not in out)
    for k in kept:
        out[k] = fresh[k]
    return out, kept


# ------------------------------------------------------------------------------------------------
# Writing the run folder


def check_output(out_dir: Path) -> None:
    if out_dir.exists() or out_dir.is_symlink():
        if not out_dir.is_dir() or any(out_dir.iterdir()):
            raise HFImportError(f"--output {out_dir} exists and is not an empty folder; choose a new folder "
                                f"(nothing was written)")


def write_run(out_dir: Path, write: Callable[[Path], None]) -> Path:
    """Call write(tmp) on a temporary folder beside out_dir, then rename it to out_dir; on any failure
    the temporary folder is removed and nothing appears under out_dir."""
    out_dir = out_dir.resolve()
    check_output(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        write(tmp)
        check_output(out_dir)  # (created meanwhile by someone else?)
        if out_dir.is_dir():
            out_dir.rmdir()
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
